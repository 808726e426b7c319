// The CUDA simulator's scheduler and the CUDA runtime calls pyrag's host code makes (see cuda_sim.h).
// Fibers: each is started once with makecontext/setcontext and afterwards switched with _setjmp/_longjmp, which,
// unlike swapcontext, costs no system call (kernels synchronise every few instructions). Build without
// _FORTIFY_SOURCE: its longjmp check refuses jumps between stacks by design.
#include "cuda_sim.h"

#include <setjmp.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

namespace pyrag_sim {

thread_local const Coords* current = nullptr;

namespace {

constexpr size_t kStackBytes = 256 << 10;  // per fiber, lazily committed; kernels' frames are small
// Inaccessible pages below each stack: larger than any kernel frame (the WMMA tile function's is ~8 KiB), so an
// overflow faults instead of writing into the neighbouring fiber's stack (GCC here has no stack-clash probing).
constexpr size_t kGuardBytes = 64 << 10;
constexpr size_t kSmemGuard = 256;   // canary bytes after dynamic shared memory
constexpr int kSmemDefault = 48 << 10;  // dynamic shared memory allowed without cudaFuncSetAttribute
constexpr int kSmemOptin = 227 << 10;   // the device's opt-in limit (H100)

enum class State { kRun, kBarrier, kWarp, kActive, kDone };

struct Fiber {
  ucontext_t uc;
  jmp_buf jb;
  char* stack = nullptr;
  State state = State::kRun;
  bool started = false;
  Coords coords;
};

// Lanes of one warp waiting in one collective: those named by mask that have arrived.
struct Group {
  unsigned mask, arrived;
  Op op;
};

struct Warp {
  std::vector<Group> groups;  // pending collectives, pairwise disjoint masks
  unsigned exited = 0;        // lanes whose thread has returned (sm_70+: no longer required by collectives)
  unsigned parked = 0;        // lanes waiting in __activemask
  uint64_t in[32], out[32];
  int arg[32];
};

struct Run {
  const LaunchConfig* cfg;
  const std::function<void()>* body;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  std::vector<unsigned char> smem_store;
  unsigned char* smem = nullptr;  // 256-byte aligned inside smem_store
  size_t static_smem = 0;         // bytes of the block's static __shared__ variables met so far
  uint64_t epoch = 0;             // the running block's number (static __shared__ are garbage-filled once per block)
  Fiber* cur = nullptr;
  int n = 0, at_barrier = 0, done = 0;
  jmp_buf sched;
  std::string error;
};

thread_local Run* g_run = nullptr;
std::mutex g_launch_mutex;  // static __shared__ variables are shared by all launches: one at a time
std::map<const void*, int> g_max_dyn_smem;
std::map<std::string, uint64_t> g_kernel_launches;  // "kernel in host function" -> launches
std::map<const void*, uint64_t> g_filled;           // static __shared__ variable -> block epoch it was filled in
uint64_t g_epoch = 0;
thread_local cudaError_t g_last_error = cudaSuccess;
int g_order = 0;          // 0 forward, 1 reverse, 2 shuffled (threads and blocks)
uint64_t g_seed = 0;
int g_sms = 4;
uint64_t g_launches = 0, g_blocks = 0;

std::string where(const Fiber& f) {
  const Coords& c = f.coords;
  return "thread (" + std::to_string(c.thread.x) + "," + std::to_string(c.thread.y) + "," +
         std::to_string(c.thread.z) + ") of block (" + std::to_string(c.block.x) + "," + std::to_string(c.block.y) +
         "," + std::to_string(c.block.z) + ")";
}

// Back to the scheduler (the fiber resumes here when it is next run).
void yield_to_scheduler() {
  Run* r = g_run;
  if (_setjmp(r->cur->jb) == 0) _longjmp(r->sched, 1);
}

// Stops the launch from inside a fiber: the scheduler throws once control is back on the launching stack.
[[noreturn]] void fail(const std::string& msg) {
  Run* r = g_run;
  if (r->error.empty()) r->error = msg + " (" + where(*r->cur) + ")";
  _longjmp(r->sched, 2);
}

unsigned linear_id(const Coords& c) {
  return c.thread.x + c.block_dim.x * (c.thread.y + c.block_dim.y * c.thread.z);
}

void release_barrier_if_complete(Run* r) {
  if (r->at_barrier > 0 && r->at_barrier + r->done == r->n) {
    for (Fiber& f : r->fibers)
      if (f.state == State::kBarrier) f.state = State::kRun;
    r->at_barrier = 0;
  }
}

// Completes group g of warp w (index wi) if every lane it names has arrived or exited: computes each arrived lane's
// result, makes the waiting ones runnable and drops the group. Reading an exited lane's or an unnamed lane's value
// gives all-one bits (CUDA leaves it undefined), never an error: kernels may shuffle from such lanes and not use it.
bool complete_if_ready(Run* r, int wi, size_t gi) {
  Warp& w = r->warps[wi];
  const Group g = w.groups[gi];
  if ((g.arrived | (w.exited & g.mask)) != g.mask) return false;
  const unsigned live = g.arrived;
  uint64_t ballot = 0;
  for (int l = 0; l < 32; ++l)
    if ((live >> l & 1u) && w.in[l]) ballot |= 1ull << l;
  for (int l = 0; l < 32; ++l) {
    if (!(live >> l & 1u)) continue;
    int src = l;
    switch (g.op) {
      case kShflIdx: src = w.arg[l] & 31; break;
      case kShflXor: src = (l ^ w.arg[l]) & 31; break;
      case kShflUp: src = l - w.arg[l] >= 0 ? l - w.arg[l] : l; break;
      case kShflDown: src = l + w.arg[l] < 32 ? l + w.arg[l] : l; break;
      default: break;
    }
    switch (g.op) {
      case kShflIdx:
      case kShflXor:
      case kShflUp:
      case kShflDown:
        w.out[l] = (live >> src & 1u) ? w.in[src] : ~uint64_t(0);
        break;
      case kBallot: w.out[l] = ballot; break;
      case kAny: w.out[l] = ballot != 0; break;
      case kAll: w.out[l] = ballot == live; break;
      case kMatchAny: {
        uint64_t m = 0;
        for (int j = 0; j < 32; ++j)
          if ((live >> j & 1u) && w.in[j] == w.in[l]) m |= 1ull << j;
        w.out[l] = m;
        break;
      }
      case kSyncWarp: w.out[l] = 0; break;
    }
  }
  w.groups.erase(w.groups.begin() + static_cast<std::ptrdiff_t>(gi));
  for (int l = 0; l < 32; ++l)
    if ((live >> l & 1u) && r->fibers[wi * 32 + l].state == State::kWarp) r->fibers[wi * 32 + l].state = State::kRun;
  return true;
}

void fiber_entry() {
  Run* r = g_run;
  std::string thrown;
  try {
    (*r->body)();
  } catch (const std::exception& e) {  // kernels do not throw; the simulator's own checks might
    thrown = e.what();
  } catch (...) {
    thrown = "an unknown exception";
  }
  if (!thrown.empty()) fail("CUDA simulator: exception in a kernel thread: " + thrown);
  r = g_run;
  Fiber& f = *r->cur;
  f.state = State::kDone;
  ++r->done;
  release_barrier_if_complete(r);  // exited threads no longer hold back a barrier (Volta and later)
  const unsigned lid = linear_id(f.coords);
  Warp& w = r->warps[lid / 32];
  w.exited |= 1u << (lid % 32);
  for (size_t gi = w.groups.size(); gi-- > 0;) complete_if_ready(r, static_cast<int>(lid / 32), gi);
  _longjmp(r->sched, 1);
}

// Runs fiber f until it waits or ends; false when it stopped the launch with an error.
bool resume(Run* r, Fiber& f) {
  r->cur = &f;
  current = &f.coords;
  const int rc = _setjmp(r->sched);
  if (rc == 0) {
    if (!f.started) {
      f.started = true;
      setcontext(&f.uc);
    }
    _longjmp(f.jb, 1);
  }
  return rc == 1;
}

// Lanes parked in __activemask are released together once nothing else can run: each gets the set of lanes parked
// with it (the lanes that reached that point "converged"). True if any were released.
bool release_parked(Run* r) {
  bool any = false;
  for (size_t wi = 0; wi < r->warps.size(); ++wi) {
    Warp& w = r->warps[wi];
    if (w.parked == 0) continue;
    for (int l = 0; l < 32; ++l)
      if (w.parked >> l & 1u) {
        w.out[l] = w.parked;
        r->fibers[wi * 32 + l].state = State::kRun;
      }
    w.parked = 0;
    any = true;
  }
  return any;
}

std::vector<int> order_of(int n, std::mt19937_64& rng) {
  std::vector<int> o(n);
  for (int i = 0; i < n; ++i) o[i] = g_order == 1 ? n - 1 - i : i;
  if (g_order == 2) std::shuffle(o.begin(), o.end(), rng);
  return o;
}

std::string state_name(const Fiber& f) {
  switch (f.state) {
    case State::kBarrier:
      return "__syncthreads";
    case State::kWarp:
      return "a warp collective";
    default:
      return "running";
  }
}

struct Stacks {
  char* base = nullptr;
  size_t bytes = 0;
  explicit Stacks(int n) {
    bytes = size_t(n) * (kStackBytes + kGuardBytes);
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("CUDA simulator: cannot map fiber stacks");
    base = static_cast<char*>(p);
    for (int i = 0; i < n; ++i) mprotect(base + i * (kStackBytes + kGuardBytes), kGuardBytes, PROT_NONE);
  }
  char* stack(int i) const { return base + i * (kStackBytes + kGuardBytes) + kGuardBytes; }
  ~Stacks() { munmap(base, bytes); }
};

bool set_launch_error(cudaError_t e) {
  g_last_error = e;
  return false;
}

int max_dynamic_smem(const void* fn) {
  auto it = g_max_dyn_smem.find(fn);
  return it == g_max_dyn_smem.end() ? kSmemDefault : it->second;
}

// Under g_launch_mutex.
bool config_ok(const LaunchConfig& c) {
  const dim3 g = c.grid, b = c.block;
  const uint64_t threads = uint64_t(b.x) * b.y * b.z;
  if (threads == 0 || threads > 1024 || b.x > 1024 || b.y > 1024 || b.z > 64)
    return set_launch_error(cudaErrorInvalidConfiguration);
  if (g.x == 0 || g.y == 0 || g.z == 0 || g.y > 65535 || g.z > 65535 || g.x > 2147483647u)
    return set_launch_error(cudaErrorInvalidConfiguration);
  if (c.smem > size_t(max_dynamic_smem(c.fn))) return set_launch_error(cudaErrorInvalidValue);
  return true;
}

}  // namespace

void* dynamic_smem() { return g_run->smem; }

void shared_garbage(void* p, size_t bytes) {
  Run* r = g_run;
  auto& epoch = g_filled[p];
  if (epoch == r->epoch) return;  // another thread of this block met the declaration first
  epoch = r->epoch;
  std::memset(p, 0xff, bytes);
  r->static_smem += bytes;
  const size_t dyn_limit = size_t(max_dynamic_smem(r->cfg->fn));
  if (r->static_smem > size_t(kSmemDefault) ||
      r->static_smem + r->cfg->smem > (dyn_limit > size_t(kSmemDefault) ? size_t(kSmemOptin) : size_t(kSmemDefault)))
    fail("CUDA simulator: " + std::to_string(r->static_smem) + " bytes of static and " +
         std::to_string(r->cfg->smem) + " of dynamic shared memory exceed what the device gives one block");
}

unsigned lane_id() { return linear_id(g_run->cur->coords) % 32; }

void check_width(int width) {
  if (width != 32) fail("CUDA simulator: shuffles with width " + std::to_string(width) + " are not modelled");
}

void fail_in_kernel(const std::string& msg) { fail("CUDA simulator: " + msg); }

void syncthreads() {
  Run* r = g_run;
  r->cur->state = State::kBarrier;
  ++r->at_barrier;
  release_barrier_if_complete(r);  // the last to arrive releases everyone and goes on
  if (r->cur->state == State::kBarrier) yield_to_scheduler();
}

unsigned activemask() {
  Run* r = g_run;
  Fiber* me = r->cur;
  const unsigned lid = linear_id(me->coords);
  r->warps[lid / 32].parked |= 1u << (lid % 32);
  me->state = State::kActive;
  yield_to_scheduler();
  return static_cast<unsigned>(r->warps[lid / 32].out[lid % 32]);
}

uint64_t warp_op(Op op, unsigned mask, uint64_t value, int arg) {
  Run* r = g_run;
  Fiber* me = r->cur;
  const unsigned linear = linear_id(me->coords);
  const int lane = static_cast<int>(linear % 32), wi = static_cast<int>(linear / 32);
  Warp& w = r->warps[wi];
  if (!(mask >> lane & 1u)) fail("CUDA simulator: a warp collective's mask does not name the calling lane");
  const unsigned warp_lanes = std::min<unsigned>(32u, static_cast<unsigned>(r->n) - linear / 32 * 32);
  if (warp_lanes < 32 && (mask >> warp_lanes) != 0) fail("CUDA simulator: a warp collective names lanes that do not exist");
  size_t gi = w.groups.size();
  for (size_t i = 0; i < w.groups.size(); ++i) {
    const Group& g = w.groups[i];
    if (g.mask == mask) {
      if (g.op != op) fail("CUDA simulator: lanes with the same mask are in different warp collectives");
      gi = i;
    } else if (g.mask & mask) {
      fail("CUDA simulator: warp collectives with overlapping masks " + std::to_string(mask) + " and " +
           std::to_string(g.mask) + " at once");
    }
  }
  if (gi == w.groups.size()) w.groups.push_back(Group{mask, 0u, op});
  w.in[lane] = value;
  w.arg[lane] = arg;
  w.groups[gi].arrived |= 1u << lane;
  me->state = State::kWarp;
  if (!complete_if_ready(r, wi, gi)) yield_to_scheduler();
  me->state = State::kRun;
  return w.out[lane];
}

void run_grid(const LaunchConfig& c, const std::function<void()>& body) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  if (!config_ok(c)) return;
  const int n = static_cast<int>(c.block.x * c.block.y * c.block.z);
  Run run;
  run.cfg = &c;
  run.body = &body;
  run.n = n;
  run.fibers.resize(n);
  run.warps.resize((n + 31) / 32);
  Stacks stacks(n);
  std::mt19937_64 rng(g_seed);
  const uint64_t nblocks = uint64_t(c.grid.x) * c.grid.y * c.grid.z;
  std::vector<uint64_t> blocks(nblocks);
  for (uint64_t i = 0; i < nblocks; ++i) blocks[i] = g_order == 1 ? nblocks - 1 - i : i;
  if (g_order == 2) std::shuffle(blocks.begin(), blocks.end(), rng);
  ++g_launches;
  g_blocks += nblocks;
  if (c.name != nullptr) ++g_kernel_launches[std::string(c.name) + " in " + (c.where != nullptr ? c.where : "?")];
  Run* const saved = g_run;
  const Coords* const saved_cur = current;
  g_run = &run;
  std::string error;
  // Dynamic shared memory: 256-byte aligned (kernels declare up to __align__(128)), garbage in, a canary after it.
  run.smem_store.resize(c.smem + kSmemGuard + 256);
  run.smem = run.smem_store.data() + (256 - reinterpret_cast<uintptr_t>(run.smem_store.data()) % 256) % 256;
  for (const uint64_t b : blocks) {
    const uint3 bid{static_cast<unsigned>(b % c.grid.x), static_cast<unsigned>(b / c.grid.x % c.grid.y),
                    static_cast<unsigned>(b / (uint64_t(c.grid.x) * c.grid.y))};
    std::memset(run.smem, 0xff, c.smem + kSmemGuard);
    run.at_barrier = run.done = 0;
    run.static_smem = 0;
    run.epoch = ++g_epoch;
    for (Warp& w : run.warps) {
      w.groups.clear();
      w.exited = w.parked = 0;
    }
    for (int t = 0; t < n; ++t) {
      Fiber& f = run.fibers[t];
      f.state = State::kRun;
      f.started = false;
      f.coords = Coords{uint3{static_cast<unsigned>(t % c.block.x), static_cast<unsigned>(t / c.block.x % c.block.y),
                              static_cast<unsigned>(t / (c.block.x * c.block.y))},
                        bid, c.block, c.grid};
      getcontext(&f.uc);
      f.uc.uc_stack.ss_sp = stacks.stack(t);
      f.uc.uc_stack.ss_size = kStackBytes;
      f.uc.uc_link = nullptr;
      makecontext(&f.uc, fiber_entry, 0);
    }
    const std::vector<int> order = order_of(n, rng);
    while (error.empty() && run.done < n) {
      bool progressed = false;
      for (const int t : order) {
        Fiber& f = run.fibers[t];
        if (f.state != State::kRun) continue;
        progressed = true;
        if (!resume(&run, f)) {
          error = run.error;
          break;
        }
      }
      if (error.empty() && !progressed && !release_parked(&run)) {
        std::string who;
        for (const Fiber& f : run.fibers)
          if (f.state != State::kDone) {
            who = where(f) + " waits at " + state_name(f);
            break;
          }
        error = "CUDA simulator: deadlock, " + std::to_string(n - run.done) + " of " + std::to_string(n) +
                " threads wait forever (" + who + "; " + std::to_string(run.done) + " have exited)";
      }
    }
    if (error.empty())
      for (size_t i = c.smem; i < c.smem + kSmemGuard; ++i)
        if (run.smem[i] != 0xff) {
          error = "CUDA simulator: a thread wrote past the " + std::to_string(c.smem) +
                  " bytes of dynamic shared memory of block (" + std::to_string(bid.x) + "," +
                  std::to_string(bid.y) + "," + std::to_string(bid.z) + ")";
          break;
        }
    if (!error.empty()) break;
  }
  g_run = saved;
  current = saved_cur;
  if (!error.empty()) throw std::runtime_error(error);
}

void configure(int order, uint64_t seed, int sms) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  g_order = order;
  g_seed = seed;
  g_sms = sms;
}

Stats stats() {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  return Stats{g_launches, g_blocks, g_kernel_launches};
}

}  // namespace pyrag_sim

// ---- the CUDA runtime calls the host code makes ----------------------------------------------------------------
extern "C" {

cudaError_t cudaGetLastError(void) {
  const cudaError_t e = pyrag_sim::g_last_error;
  pyrag_sim::g_last_error = cudaSuccess;
  return e;
}

const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument";
    default:
      return "CUDA simulator error";
  }
}

cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int device) {
  if (device != 0) return pyrag_sim::g_last_error = cudaErrorInvalidDevice;
  switch (attr) {
    case cudaDevAttrMultiProcessorCount:
      *value = pyrag_sim::g_sms;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = pyrag_sim::kSmemOptin;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock:
      *value = pyrag_sim::kSmemDefault;
      return cudaSuccess;
    case cudaDevAttrWarpSize:
      *value = 32;
      return cudaSuccess;
    case cudaDevAttrMaxThreadsPerBlock:
      *value = 1024;
      return cudaSuccess;
    default:
      return pyrag_sim::g_last_error = cudaErrorInvalidValue;
  }
}

cudaError_t cudaFuncSetAttribute(const void* func, enum cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaSuccess;
  if (value < 0 || value > pyrag_sim::kSmemOptin) return pyrag_sim::g_last_error = cudaErrorInvalidValue;
  std::lock_guard<std::mutex> lock(pyrag_sim::g_launch_mutex);
  pyrag_sim::g_max_dyn_smem[func] = value;
  return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void* p, int value, size_t count, cudaStream_t) {
  std::memset(p, value, count);
  return cudaSuccess;
}

}  // extern "C"
