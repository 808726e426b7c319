// The CUDA simulator's scheduler and the CUDA runtime calls pyrag's host code makes (see cuda_sim.h).
// Fibers: each is started once with makecontext/setcontext and afterwards switched with _setjmp/_longjmp, which,
// unlike swapcontext, costs no system call (kernels synchronise every few instructions). Build without
// _FORTIFY_SOURCE: its longjmp check refuses jumps between stacks by design.
#include "cuda_sim.h"

#include <setjmp.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
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
constexpr size_t kGuardBytes = 4096;
constexpr size_t kSmemGuard = 256;   // canary bytes after dynamic shared memory
constexpr int kSmemDefault = 48 << 10;  // dynamic shared memory allowed without cudaFuncSetAttribute
constexpr int kSmemOptin = 227 << 10;   // the device's opt-in limit (H100)

enum class State { kRun, kBarrier, kWarp, kDone };

struct Fiber {
  ucontext_t uc;
  jmp_buf jb;
  char* stack = nullptr;
  State state = State::kRun;
  bool started = false;
  Coords coords;
};

struct Warp {
  unsigned arrived = 0, mask = 0;
  Op op = kSyncWarp;
  uint64_t in[32], out[32];
  int arg[32];
};

struct Run {
  const LaunchConfig* cfg;
  const std::function<void()>* body;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  std::vector<unsigned char> smem;
  Fiber* cur = nullptr;
  int n = 0, at_barrier = 0, done = 0;
  jmp_buf sched;
  std::string error;
};

thread_local Run* g_run = nullptr;
std::mutex g_launch_mutex;  // static __shared__ variables are shared by all launches: one at a time
std::map<const void*, int> g_max_dyn_smem;
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

void fiber_entry() {
  Run* r = g_run;
  (*r->body)();
  r = g_run;
  r->cur->state = State::kDone;
  ++r->done;
  if (r->at_barrier > 0 && r->at_barrier + r->done == r->n) {  // the last thread a barrier waited for has exited
    for (Fiber& f : r->fibers)
      if (f.state == State::kBarrier) f.state = State::kRun;
    r->at_barrier = 0;
  }
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

bool config_ok(const LaunchConfig& c) {
  const dim3 g = c.grid, b = c.block;
  const uint64_t threads = uint64_t(b.x) * b.y * b.z;
  if (threads == 0 || threads > 1024 || b.x > 1024 || b.y > 1024 || b.z > 64)
    return set_launch_error(cudaErrorInvalidConfiguration);
  if (g.x == 0 || g.y == 0 || g.z == 0 || g.y > 65535 || g.z > 65535 || g.x > 2147483647u)
    return set_launch_error(cudaErrorInvalidConfiguration);
  auto it = g_max_dyn_smem.find(c.fn);
  const int allowed = it == g_max_dyn_smem.end() ? kSmemDefault : it->second;
  if (c.smem > size_t(allowed)) return set_launch_error(cudaErrorInvalidValue);
  return true;
}

}  // namespace

void* dynamic_smem() { return g_run->smem.data(); }

unsigned lane_mask() {
  const Coords& c = g_run->cur->coords;
  const unsigned linear = c.thread.x + c.block_dim.x * (c.thread.y + c.block_dim.y * c.thread.z);
  return 1u << (linear % 32);
}

void check_width(int width) {
  if (width != 32) fail("CUDA simulator: shuffles with width " + std::to_string(width) + " are not modelled");
}

void syncthreads() {
  Run* r = g_run;
  r->cur->state = State::kBarrier;
  if (++r->at_barrier + r->done == r->n) {  // the last to arrive releases everyone and goes on
    for (Fiber& f : r->fibers)
      if (f.state == State::kBarrier) f.state = State::kRun;
    r->at_barrier = 0;
    return;
  }
  yield_to_scheduler();
}

uint64_t warp_op(Op op, unsigned mask, uint64_t value, int arg) {
  Run* r = g_run;
  Fiber* me = r->cur;
  const Coords& c = me->coords;
  const unsigned linear = c.thread.x + c.block_dim.x * (c.thread.y + c.block_dim.y * c.thread.z);
  const int lane = static_cast<int>(linear % 32);
  Warp& w = r->warps[linear / 32];
  if (!(mask >> lane & 1u)) fail("CUDA simulator: a warp collective's mask does not name the calling lane");
  const unsigned warp_lanes = std::min<unsigned>(32u, static_cast<unsigned>(r->n) - linear / 32 * 32);
  if (warp_lanes < 32 && (mask >> warp_lanes) != 0) fail("CUDA simulator: a warp collective names lanes that do not exist");
  if (w.arrived == 0) {
    w.mask = mask;
    w.op = op;
  } else if (w.mask != mask || w.op != op) {
    fail("CUDA simulator: lanes of one warp are in different collectives at once (mask " + std::to_string(mask) +
         " vs " + std::to_string(w.mask) + ")");
  }
  w.in[lane] = value;
  w.arg[lane] = arg;
  w.arrived |= 1u << lane;
  if (w.arrived != mask) {
    me->state = State::kWarp;
    yield_to_scheduler();
    return w.out[lane];
  }
  // Everyone is here: compute every participant's result, release them.
  uint64_t all = 0, any = 0, every = 1;
  for (int l = 0; l < 32; ++l)
    if (mask >> l & 1u) {
      if (w.in[l]) all |= 1ull << l;
      any |= w.in[l] != 0;
      every &= w.in[l] != 0;
    }
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    int src = l;
    switch (op) {
      case kShflIdx:
        src = w.arg[l] & 31;
        break;
      case kShflXor:
        src = (l ^ w.arg[l]) & 31;
        break;
      case kShflUp:
        src = l - w.arg[l] >= 0 ? l - w.arg[l] : l;
        break;
      case kShflDown:
        src = l + w.arg[l] < 32 ? l + w.arg[l] : l;
        break;
      default:
        break;
    }
    if (!(mask >> src & 1u)) {
      w.arrived = 0;
      fail("CUDA simulator: lane " + std::to_string(l) + " shuffles from lane " + std::to_string(src) +
           ", which is outside the mask");
    }
    switch (op) {
      case kShflIdx:
      case kShflXor:
      case kShflUp:
      case kShflDown:
        w.out[l] = w.in[src];
        break;
      case kBallot:
        w.out[l] = all;
        break;
      case kAny:
        w.out[l] = any;
        break;
      case kAll:
        w.out[l] = every;
        break;
      case kMatchAny: {
        uint64_t m = 0;
        for (int j = 0; j < 32; ++j)
          if ((mask >> j & 1u) && w.in[j] == w.in[l]) m |= 1ull << j;
        w.out[l] = m;
        break;
      }
      case kSyncWarp:
        w.out[l] = 0;
        break;
    }
  }
  w.arrived = 0;
  const unsigned base = linear / 32 * 32;
  for (int l = 0; l < 32; ++l)
    if ((mask >> l & 1u) && l != lane) r->fibers[base + l].state = State::kRun;
  return w.out[lane];
}

void run_grid(const LaunchConfig& c, const std::function<void()>& body) {
  if (!config_ok(c)) return;
  std::lock_guard<std::mutex> lock(g_launch_mutex);
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
  Run* const saved = g_run;
  const Coords* const saved_cur = current;
  g_run = &run;
  std::string error;
  for (const uint64_t b : blocks) {
    const uint3 bid{static_cast<unsigned>(b % c.grid.x), static_cast<unsigned>(b / c.grid.x % c.grid.y),
                    static_cast<unsigned>(b / (uint64_t(c.grid.x) * c.grid.y))};
    run.smem.assign(c.smem + kSmemGuard, 0xff);  // garbage in, as on the device; the tail is the canary
    run.at_barrier = run.done = 0;
    for (Warp& w : run.warps) w.arrived = 0;
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
      if (error.empty() && !progressed) {
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
      for (size_t i = c.smem; i < run.smem.size(); ++i)
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
  g_order = order;
  g_seed = seed;
  g_sms = sms;
}

Stats stats() {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  return Stats{g_launches, g_blocks};
}

}  // namespace pyrag_sim

// ---- the CUDA runtime calls the host code makes ----------------------------------------------------------------
extern "C" {

cudaError_t cudaGetLastError(void) {
  const cudaError_t e = pyrag_sim::g_last_error;
  pyrag_sim::g_last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError(void) { return pyrag_sim::g_last_error; }

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
  if (device != 0) return cudaErrorInvalidDevice;
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
      return cudaErrorInvalidValue;
  }
}

cudaError_t cudaFuncSetAttribute(const void* func, enum cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaSuccess;
  if (value < 0 || value > pyrag_sim::kSmemOptin) return cudaErrorInvalidValue;
  std::lock_guard<std::mutex> lock(pyrag_sim::g_launch_mutex);
  pyrag_sim::g_max_dyn_smem[func] = value;
  return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void* p, int value, size_t count, cudaStream_t) {
  std::memset(p, value, count);
  return cudaSuccess;
}

}  // extern "C"
