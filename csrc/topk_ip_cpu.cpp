// CPU kernels of pyrag.topk_ip: tiled dot products fused with per-query threshold-filtered top-k buffers, OpenMP
// over docs (few queries: memory bound) or queries (many: compute bound), SIMD kernels picked at run time.
#include "topk_ip.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <exception>
#include <limits>
#include <mutex>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#define PYRAG_X86 1
#include <cpuid.h>
#include <immintrin.h>
#endif

namespace pyrag::topk {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Result order: higher score first, then lower id. Buffers never hold NaN (a NaN score is never admitted), so
// this is a strict weak order.
inline bool better(const Hit& a, const Hit& b) { return a.score > b.score || (a.score == b.score && a.id < b.id); }

// Running top-k of one query over one stream of docs fed in increasing id order. Scores above `thr` are appended;
// when the buffer is full the best k are kept (nth_element) and thr becomes the k-th best score. Because ids only
// grow, a later doc scoring exactly thr loses the tie, so the strict `score > thr` test is the whole admission
// rule. Until the first compaction thr stays -inf, so NaN and -inf scores are left out; finish() adds them back
// (as -inf, lowest ids first) in the rare case that fewer than k docs scored above -inf.
struct Selector {
  Hit* buf;
  int64_t count;
  int64_t cap;  // > k whenever a compaction can happen; otherwise > the number of docs this selector sees
  int64_t k;
  float thr;

  void push(float s, int64_t id) {
    buf[count].score = s;
    buf[count].id = id;
    if (++count == cap) compact();
  }
  void compact() {
    std::nth_element(buf, buf + (k - 1), buf + count, better);
    count = k;
    thr = buf[k - 1].score;
  }
  // Sorted best min(k, hi - lo) of docs [lo, hi) into out; returns how many.
  int64_t finish(int64_t lo, int64_t hi, Hit* out) {
    const int64_t m = std::min(k, hi - lo);
    if (count < m) {
      std::vector<int64_t> have(count);
      for (int64_t i = 0; i < count; ++i) have[i] = buf[i].id;
      std::sort(have.begin(), have.end());
      size_t h = 0;
      for (int64_t id = lo; count < m; ++id) {
        while (h < have.size() && have[h] < id) ++h;
        if (h < have.size() && have[h] == id) continue;
        buf[count].score = kNegInf;
        buf[count].id = id;
        ++count;
      }
    }
    std::partial_sort(buf, buf + m, buf + count, better);
    std::copy(buf, buf + m, out);
    return m;
  }
};

// Capacity of a selector that will see `len` docs: 2k amortises compaction to O(1) per admitted doc; a stream no
// longer than the buffer never compacts (cap = len + 1 keeps the `++count == cap` test from firing).
inline int64_t selector_cap(int64_t k, int64_t len) { return std::min(std::max(2 * k, k + 64), len + 1); }

template <class T>
using TilePassFn = void (*)(const float*, int64_t, int64_t, const T*, const float*, int64_t, int64_t, int64_t, float*,
                            Selector*);
using ScanFn = void (*)(Selector&, const float*, int64_t, int64_t);
template <class T>
using ConvertFn = void (*)(const T*, int64_t, int64_t, uint16_t*, float*, const float*);
template <class T>
using PrefilterFn = void (*)(Selector&, const uint16_t*, int64_t, int64_t, const float*, const T*, const float*,
                             int64_t, float, float, float, const float*);

// ---- one copy of the SIMD part per instruction set ----
#if defined(PYRAG_X86)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")
#endif
namespace avx512 {
#define PYRAG_SIMD 512
#include "topk_ip_simd.inc"
#undef PYRAG_SIMD
}  // namespace avx512
#if defined(__clang__)
#pragma clang attribute pop
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif
namespace avx2 {
#define PYRAG_SIMD 256
#include "topk_ip_simd.inc"
#undef PYRAG_SIMD
}  // namespace avx2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // PYRAG_X86

namespace scalar {
#define PYRAG_SIMD 0
#include "topk_ip_simd.inc"
#undef PYRAG_SIMD
}  // namespace scalar

Isa checked_isa(int isa) {
  const int best = static_cast<int>(best_cpu_isa());
  if (isa < 0) return static_cast<Isa>(best);
  if (isa > best) {
    throw std::invalid_argument("topk_ip: isa=" + std::to_string(isa) + " is not supported by this CPU (best is " +
                                std::to_string(best) + ")");
  }
  return static_cast<Isa>(isa);
}

template <class T>
TilePassFn<T> tile_kernel(Isa isa) {
  switch (isa) {
#if defined(PYRAG_X86)
    case Isa::avx512: return avx512::Kernels::tile<T>();
    case Isa::avx2: return avx2::Kernels::tile<T>();
#endif
    default: return scalar::Kernels::tile<T>();
  }
}

template <class T>
ConvertFn<T> convert_kernel(Isa isa) {
  switch (isa) {
#if defined(PYRAG_X86)
    case Isa::avx512: return avx512::Kernels::convert<T>();
    case Isa::avx2: return avx2::Kernels::convert<T>();
#endif
    default: return scalar::Kernels::convert<T>();
  }
}

template <class T>
PrefilterFn<T> prefilter_kernel(Isa isa) {
  switch (isa) {
#if defined(PYRAG_X86)
    case Isa::avx512: return avx512::Kernels::prefilter<T>();
    case Isa::avx2: return avx2::Kernels::prefilter<T>();
#endif
    default: return scalar::Kernels::prefilter<T>();
  }
}

ScanFn scan_kernel(Isa isa) {
  switch (isa) {
#if defined(PYRAG_X86)
    case Isa::avx512: return avx512::Kernels::scan();
    case Isa::avx2: return avx2::Kernels::scan();
#endif
    default: return scalar::Kernels::scan();
  }
}

// Collects the first exception thrown inside an OpenMP region (an exception may not cross its boundary) and
// rethrows it on the calling thread afterwards.
class ErrorSink {
 public:
  template <class F>
  void run(F&& f) {
    try {
      f();
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu_);
      if (!err_) err_ = std::current_exception();
    }
  }
  void rethrow() {
    if (err_) std::rethrow_exception(err_);
  }

 private:
  std::mutex mu_;
  std::exception_ptr err_;
};

// Searches queries [qa, qb) against docs [lo, hi) tile by tile and hands each query's sorted best min(k, hi - lo)
// to emit(q, hits, m). Memory: (qb - qa) selectors of selector_cap Hits plus one [QBMAX, tile_n] score tile.
template <class T, class Emit>
void search_range(TilePassFn<T> pass, const float* queries, int64_t qa, int64_t qb, const T* docs, const float* scale,
                  int64_t lo, int64_t hi, int64_t dim, int64_t k, int64_t tile_n, Emit&& emit) {
  const int64_t nq = qb - qa, cap = selector_cap(k, hi - lo);
  std::vector<Hit> store(static_cast<size_t>(nq * cap));
  std::vector<Selector> sels(static_cast<size_t>(nq));
  for (int64_t i = 0; i < nq; ++i) sels[i] = Selector{store.data() + i * cap, 0, cap, k, kNegInf};
  std::vector<float> sbuf(static_cast<size_t>(4 * tile_n));  // 4 >= QBMAX of every ISA
  for (int64_t t0 = lo; t0 < hi; t0 += tile_n)
    pass(queries, qa, qb, docs, scale, t0, std::min(hi, t0 + tile_n), dim, sbuf.data(), sels.data());
  std::vector<Hit> out(static_cast<size_t>(std::min(k, hi - lo)));
  for (int64_t i = 0; i < nq; ++i) {
    const int64_t m = sels[i].finish(lo, hi, out.data());
    emit(qa + i, out.data(), m);
  }
}

inline void write_row(const Hit* hits, int64_t m, float* scores, int64_t* ids) {
  for (int64_t j = 0; j < m; ++j) {
    scores[j] = hits[j].score;
    ids[j] = hits[j].id;
  }
}

}  // namespace

Isa best_cpu_isa() {
#if defined(PYRAG_X86)
  // __builtin_cpu_supports also checks that the OS saves the AVX/AVX-512 registers (XCR0).
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
    return Isa::avx512;
  unsigned a = 0, b = 0, c = 0, d = 0;
  const bool f16c = __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C);
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c) return Isa::avx2;
#endif
  return Isa::scalar;
}

template <class T>
void topk_ip_cpu(const float* queries, const T* docs, const float* scale, int64_t nq, int64_t nb, int64_t dim,
                 int64_t k, float* scores, int64_t* ids, const CpuOptions& opt) {
  if (nq < 0 || nb < 1 || dim < 1 || k < 1 || k > nb)
    throw std::invalid_argument("topk_ip: bad sizes nq=" + std::to_string(nq) + " nb=" + std::to_string(nb) +
                                " dim=" + std::to_string(dim) + " k=" + std::to_string(k));
  if (opt.threads < 1 || opt.tile_n < 0 || opt.split < 0 || opt.split > 2 || opt.parts < 0)
    throw std::invalid_argument("topk_ip: bad options");
  if (nq == 0) return;
  const TilePassFn<T> pass = tile_kernel<T>(checked_isa(opt.isa));
  // Default tile: ~192 KiB of doc rows, so a tile read from DRAM by the first query block is served from L2 to
  // the others; at least 16 rows so the per-tile overhead stays small for wide rows.
  int64_t tile_n = opt.tile_n;
  if (tile_n == 0) tile_n = std::clamp<int64_t>((192 << 10) / (dim * static_cast<int64_t>(sizeof(T))), 16, 4096);
  const int threads = opt.threads;
  int split = opt.split;
  if (split == 0) {
    // Few queries: reading the docs dominates, so each thread streams its own slice of docs once (then a cheap
    // merge). Many queries: arithmetic dominates, so threads take query slices and share nothing; so do tiny
    // corpora where a doc slice per thread would be too short to amortise the per-thread setup.
    split = (threads == 1 || nq >= 32 * threads || nb < 4096 * threads) ? 2 : 1;
  }
  ErrorSink errors;
  if (split == 2) {
    const int64_t chunks = std::min<int64_t>(threads, nq);
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int64_t c = 0; c < chunks; ++c) {
      errors.run([&] {
        search_range<T>(pass, queries, nq * c / chunks, nq * (c + 1) / chunks, docs, scale, 0, nb, dim, k, tile_n,
                        [&](int64_t q, const Hit* hits, int64_t m) { write_row(hits, m, scores + q * k, ids + q * k); });
      });
    }
    errors.rethrow();
    return;
  }
  // Split the docs into parts, each searched for all queries; then merge the parts' sorted lists per query.
  const int64_t parts = std::min<int64_t>(opt.parts > 0 ? opt.parts : threads, nb);
  std::vector<Hit> partial(static_cast<size_t>(parts * nq * k));
  std::vector<int64_t> plen(static_cast<size_t>(parts));
#pragma omp parallel for num_threads(threads) schedule(static, 1)
  for (int64_t p = 0; p < parts; ++p) {
    errors.run([&] {
      const int64_t lo = nb * p / parts, hi = nb * (p + 1) / parts;
      plen[p] = std::min(k, hi - lo);
      search_range<T>(pass, queries, 0, nq, docs, scale, lo, hi, dim, k, tile_n,
                      [&](int64_t q, const Hit* hits, int64_t m) {
                        std::copy(hits, hits + m, partial.data() + (p * nq + q) * k);
                      });
    });
  }
  errors.rethrow();
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t q = 0; q < nq; ++q) {
    errors.run([&] {
      std::vector<Hit> all;
      all.reserve(static_cast<size_t>(parts * k));
      for (int64_t p = 0; p < parts; ++p) {
        const Hit* h = partial.data() + (p * nq + q) * k;
        all.insert(all.end(), h, h + plen[p]);
      }
      std::partial_sort(all.begin(), all.begin() + k, all.end(), better);
      write_row(all.data(), k, scores + q * k, ids + q * k);
    });
  }
  errors.rethrow();
}

template void topk_ip_cpu<float>(const float*, const float*, const float*, int64_t, int64_t, int64_t, int64_t, float*,
                                 int64_t*, const CpuOptions&);
template void topk_ip_cpu<half_t>(const float*, const half_t*, const float*, int64_t, int64_t, int64_t, int64_t,
                                  float*, int64_t*, const CpuOptions&);
template void topk_ip_cpu<bf16_t>(const float*, const bf16_t*, const float*, int64_t, int64_t, int64_t, int64_t,
                                  float*, int64_t*, const CpuOptions&);
template void topk_ip_cpu<int8_t>(const float*, const int8_t*, const float*, int64_t, int64_t, int64_t, int64_t,
                                  float*, int64_t*, const CpuOptions&);

// ---- streaming selection over caller-computed score tiles ----

void select_init(const SelectState& st) {
  for (int64_t q = 0; q < st.nq; ++q) {
    st.count[q] = 0;
    st.thr[q] = kNegInf;
  }
}

void select_tile(const SelectState& st, const float* tile, int64_t tn, int64_t ld, int64_t id0, int threads, int isa) {
  if (st.cap < st.k + 1) throw std::invalid_argument("select_tile: cap must be >= k + 1");
  const ScanFn scan = scan_kernel(checked_isa(isa));
#pragma omp parallel for num_threads(std::max(1, threads)) schedule(static)
  for (int64_t q = 0; q < st.nq; ++q) {
    Selector sel{st.hits + q * st.cap, st.count[q], st.cap, st.k, st.thr[q]};
    scan(sel, tile + q * ld, tn, id0);
    st.count[q] = sel.count;
    st.thr[q] = sel.thr;
  }
}

void select_finish(const SelectState& st, int64_t nb, float* scores, int64_t* ids, int threads) {
  if (st.k > nb) throw std::invalid_argument("select_finish: k > nb");
  ErrorSink errors;
#pragma omp parallel for num_threads(std::max(1, threads)) schedule(static)
  for (int64_t q = 0; q < st.nq; ++q) {
    errors.run([&] {
      Selector sel{st.hits + q * st.cap, st.count[q], st.cap, st.k, st.thr[q]};
      std::vector<Hit> out(static_cast<size_t>(st.k));
      sel.finish(0, nb, out.data());
      write_row(out.data(), st.k, scores + q * st.k, ids + q * st.k);
    });
  }
  errors.rethrow();
}

// ---- bf16 prefilter path ----

template <class T>
void prefilter_convert(const T* docs, int64_t n, int64_t dim, uint16_t* dst, float* dnorm, const float* scale,
                       int threads, int isa) {
  const ConvertFn<T> convert = convert_kernel<T>(checked_isa(isa));
  constexpr int64_t kRows = 64;  // rows per task: enough work to amortise scheduling, small enough to balance
  const int64_t tasks = (n + kRows - 1) / kRows;
#pragma omp parallel for num_threads(std::max(1, threads)) schedule(static)
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t r0 = t * kRows, rn = std::min(kRows, n - r0);
    convert(docs + r0 * dim, rn, dim, dst != nullptr ? dst + r0 * dim : nullptr, dnorm + r0,
            scale != nullptr ? scale + r0 : nullptr);
  }
}

template <class T>
void prefilter_select(const SelectState& st, const uint16_t* approx, int64_t ld, int64_t tn, int64_t id0,
                      const float* queries, const T* docs, const float* scale, int64_t dim, const float* qc,
                      const float* e0, const float* dlim, const float* dnorm, int threads, int isa) {
  if (st.cap < st.k + 1) throw std::invalid_argument("prefilter_select: cap must be >= k + 1");
  const PrefilterFn<T> pre = prefilter_kernel<T>(checked_isa(isa));
#pragma omp parallel for num_threads(std::max(1, threads)) schedule(dynamic, 4)
  for (int64_t q = 0; q < st.nq; ++q) {
    Selector sel{st.hits + q * st.cap, st.count[q], st.cap, st.k, st.thr[q]};
    pre(sel, approx + q * ld, tn, id0, queries + q * dim, docs, scale, dim, qc[q], e0[q], dlim[q], dnorm);
    st.count[q] = sel.count;
    st.thr[q] = sel.thr;
  }
}

#define PYRAG_TOPK_PREFILTER(T)                                                                                  \
  template void prefilter_convert<T>(const T*, int64_t, int64_t, uint16_t*, float*, const float*, int, int);     \
  template void prefilter_select<T>(const SelectState&, const uint16_t*, int64_t, int64_t, int64_t, const float*, \
                                    const T*, const float*, int64_t, const float*, const float*, const float*,     \
                                    const float*, int, int);
PYRAG_TOPK_PREFILTER(float)
PYRAG_TOPK_PREFILTER(half_t)
PYRAG_TOPK_PREFILTER(bf16_t)
PYRAG_TOPK_PREFILTER(int8_t)
#undef PYRAG_TOPK_PREFILTER

}  // namespace pyrag::topk
