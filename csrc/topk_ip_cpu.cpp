// CPU kernels of pyrag.topk_ip: tiled dot products fused with per-query threshold-filtered top-k buffers, OpenMP
// over docs (few queries: memory bound) or queries (many), SIMD kernels picked at run time, and an AMX bf16
// prefilter with exact fp32 rescoring for many queries on CPUs that have AMX.
#include "topk_ip.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <exception>
#include <limits>
#include <memory>
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
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace pyrag::topk {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// One candidate of a running top-k.
struct Hit {
  float score;
  int64_t id;
};

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
                            float*, Selector*);
template <class T>
using Exact1Fn = float (*)(const float*, const T*, int64_t);

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
Exact1Fn<T> exact_kernel(Isa isa) {
  switch (isa) {
#if defined(PYRAG_X86)
    case Isa::avx512: return avx512::Kernels::exact<T>();
    case Isa::avx2: return avx2::Kernels::exact<T>();
#endif
    default: return scalar::Kernels::exact<T>();
  }
}

// ---- the AMX bf16 prefilter (large Q on CPUs with AMX) ----
// Exact fp32 search at large Q is a GEMM at the FMA peak (~32 FMA/cycle/core); FAISS and torch already run there,
// so no fp32 kernel can beat them by much. AMX multiplies bf16 tiles ~8-16x faster. This path scores every doc
// with AMX (queries and docs rounded to bf16, fp32 accumulation), bounds the gap to the exact fp32 score
// rigorously, and computes the exact score -- with the fused path's own dot kernel -- only for docs whose
// approximate score + bound reaches the query's current k-th exact score. Every other doc provably cannot enter
// the top k, so the result is bit-identical to the fused path. On typical data a few hundred docs per query are
// rescored; where many docs tie within the bound (near-duplicate corpora) it degrades towards the fused cost.
// Bound, with u = 2^-24, r = 2^-8 (bf16 rounding), g = D u / (1 - D u), by Cauchy-Schwarz:
//   |q'.d' - q.d| <= r |q||d| (2 + r)   (r |q||d| when docs are bf16 or int8: bf16 holds them exactly)
//   AMX accumulation <= 2 g (1+r)^2 |q||d| (twice the fp32 bound), the fp32 kernel's own error <= g |q||d|;
//   all times 1.01, plus 2^-100 (D + sqrt(D) (|q| + |d|)) for denormals the AMX unit flushes to zero.
// The analysis assumes no overflow, which |q||d| <= 2^126 guarantees for every partial sum in any order; docs
// beyond that are always rescored.
constexpr int64_t kAmxMinQ = 32;    // measured crossover: below it the fused kernel is memory bound and wins
constexpr int64_t kAmxTile = 128;   // docs per tile: 192 KiB of bf16 rows at D = 768, L2-resident

bool amx_usable_impl();

#if defined(PYRAG_X86) && defined(__linux__)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx2,fma,f16c"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx2,fma,f16c")
#endif
namespace amx {

struct alignas(64) TileConfig {
  uint8_t palette;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

inline uint16_t bf16_bits(float f) {
  bf16_t b;
  from_float(f, &b);
  return b.bits;
}

// Queries as AMX B tiles (VNNI layout), 16 queries per block, 32 dims per tile:
// qv[(blk * kbs + kb) * 512 + r * 32 + n * 2 + e] = bf16(q[blk * 16 + n][kb * 32 + 2 r + e]), zero past nq / dim.
void pack_queries(const float* q, int64_t nq, int64_t dim, int64_t blocks, int64_t kbs, uint16_t* qv) {
  for (int64_t blk = 0; blk < blocks; ++blk)
    for (int64_t kb = 0; kb < kbs; ++kb)
      for (int r = 0; r < 16; ++r)
        for (int n = 0; n < 16; ++n)
          for (int e = 0; e < 2; ++e) {
            const int64_t qi = blk * 16 + n, c = kb * 32 + 2 * r + e;
            qv[(blk * kbs + kb) * 512 + r * 32 + n * 2 + e] = (qi < nq && c < dim) ? bf16_bits(q[qi * dim + c]) : 0;
          }
}

// Doc rows [0, n) -> bf16 rows of stride dp (zero padded, rows up to n32 zeroed) and dnorm[i] >= the L2 norm of
// the dequantised row: accumulated in fp64 (no overflow/underflow for finite fp32 data), rounded up to fp32.
template <class T>
void convert_tile(const T* src, int64_t n, int64_t n32, int64_t dim, int64_t dp, uint16_t* dst, float* dnorm,
                  const float* scale) {
  for (int64_t r = 0; r < n; ++r) {
    const T* x = src + r * dim;
    uint16_t* y = dst + r * dp;
    __m512d acc0 = _mm512_setzero_pd(), acc1 = _mm512_setzero_pd();
    int64_t i = 0;
    for (; i + 16 <= dim; i += 16) {
      const __m512 v = avx512::vload(x + i);
      const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v)), hi = _mm512_cvtps_pd(avx512::high256(v));
      acc0 = _mm512_fmadd_pd(lo, lo, acc0);
      acc1 = _mm512_fmadd_pd(hi, hi, acc1);
      // Round to nearest even on the bits (a signalling NaN may turn into inf; the NaN norm flags the row anyway).
      const __m512i u = _mm512_castps_si512(v);
      const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
      const __m512i rr = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i), _mm512_cvtepi32_epi16(rr));
    }
    double ss = _mm512_reduce_add_pd(_mm512_add_pd(acc0, acc1));
    for (; i < dim; ++i) {
      float f;
      if constexpr (std::is_same<T, int8_t>::value) f = static_cast<float>(x[i]);
      else f = to_float(x[i]);
      ss += static_cast<double>(f) * f;
      y[i] = bf16_bits(f);
    }
    std::memset(y + dim, 0, sizeof(uint16_t) * (dp - dim));
    double nrm = std::sqrt(ss) * (1.0 + 1e-12);  // covers the fp64 rounding of the sum and the sqrt
    if (scale != nullptr) nrm *= std::fabs(static_cast<double>(scale[r]));
    const float f = static_cast<float>(nrm);
    dnorm[r] = static_cast<double>(f) >= nrm ? f : std::nextafter(f, std::numeric_limits<float>::infinity());
  }
  for (int64_t r = n; r < n32; ++r) {
    std::memset(dst + r * dp, 0, sizeof(uint16_t) * dp);
    dnorm[r] = 0.0f;
  }
}

// Read-only inputs shared by the threads.
template <class T>
struct Shared {
  const float* queries;
  const T* docs;
  const float* scale;
  int64_t nq, dim, dp, kbs, qpairs;
  const uint16_t* qv;                     // packed queries
  const float *qc, *e0, *dlim;            // per query, padded to qpairs * 32
  Exact1Fn<T> exact;
};

// One thread's pass over doc tiles, for all queries: convert the tile, 2 x 2 blocks of 16 x 16 AMX tiles
// (32 docs x 32 queries, tmm0-3 accumulate, tmm4-5 docs, tmm6-7 queries), then the bound test per doc and query.
template <class T>
class Pass {
 public:
  Pass(const Shared<T>& sh, int64_t tile_n)
      : sh_(sh), abuf_(static_cast<size_t>(tile_n * sh.dp)), dnorm_(static_cast<size_t>(tile_n)),
        thr_(static_cast<size_t>(sh.qpairs * 32), kNegInf) {
    TileConfig cfg;
    std::memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; ++t) {
      cfg.colsb[t] = 64;
      cfg.rows[t] = 16;
    }
    _tile_loadconfig(&cfg);
  }
  ~Pass() { _tile_release(); }
  Pass(const Pass&) = delete;
  Pass& operator=(const Pass&) = delete;

  void operator()(int64_t t0, int64_t t1, Selector* sels) {
    const int64_t n = t1 - t0, n32 = (n + 31) / 32 * 32, dp = sh_.dp;
    convert_tile(sh_.docs + t0 * sh_.dim, n, n32, sh_.dim, dp, abuf_.data(), dnorm_.data(),
                 sh_.scale != nullptr ? sh_.scale + t0 : nullptr);
    const int stride = static_cast<int>(dp * 2);
    for (int64_t qp = 0; qp < sh_.qpairs; ++qp) {
      const uint16_t* b0 = sh_.qv + (2 * qp) * sh_.kbs * 512;
      const uint16_t* b1 = b0 + sh_.kbs * 512;
      for (int64_t j0 = 0; j0 < n; j0 += 32) {
        const uint16_t* a0 = abuf_.data() + j0 * dp;
        const uint16_t* a1 = a0 + 16 * dp;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t kb = 0; kb < sh_.kbs; ++kb) {
          _tile_loadd(4, a0 + kb * 32, stride);
          _tile_loadd(5, a1 + kb * 32, stride);
          _tile_loadd(6, b0 + kb * 512, 64);
          _tile_loadd(7, b1 + kb * 512, 64);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
        _tile_stored(0, cbuf_, 128);  // cbuf_[doc][query]: 32 x 32 fp32
        _tile_stored(1, cbuf_ + 16, 128);
        _tile_stored(2, cbuf_ + 512, 128);
        _tile_stored(3, cbuf_ + 528, 128);
        select(t0 + j0, std::min<int64_t>(32, n - j0), qp, j0, sels);
      }
    }
  }

 private:
  // Docs id0 + r (r < rows, ascending, as the selectors need) against queries qp * 32 + [0, 32).
  void select(int64_t id0, int64_t rows, int64_t qp, int64_t j0, Selector* sels) {
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t doc = id0 + r;
      const float dn = dnorm_[j0 + r];
      const float sc = sh_.scale != nullptr ? sh_.scale[doc] : 1.0f;
      const __m512 vdn = _mm512_set1_ps(dn);
      for (int h = 0; h < 2; ++h) {
        const int64_t qb = qp * 32 + h * 16;
        if (qb >= sh_.nq) break;
        __m512 a = _mm512_loadu_ps(cbuf_ + r * 32 + h * 16);
        if (sh_.scale != nullptr) a = _mm512_mul_ps(a, _mm512_set1_ps(sc));
        const __m512 ub = _mm512_add_ps(a, _mm512_fmadd_ps(_mm512_loadu_ps(sh_.qc + qb), vdn, _mm512_loadu_ps(sh_.e0 + qb)));
        unsigned m = _mm512_cmp_ps_mask(ub, _mm512_loadu_ps(thr_.data() + qb), _CMP_NLT_UQ) |
                     _mm512_cmp_ps_mask(vdn, _mm512_loadu_ps(sh_.dlim + qb), _CMP_NLE_UQ);
        if (sh_.nq - qb < 16) m &= (1u << (sh_.nq - qb)) - 1u;
        while (m) {
          const int64_t q = qb + __builtin_ctz(m);
          m &= m - 1;
          float s = sh_.exact(sh_.queries + q * sh_.dim, sh_.docs + doc * sh_.dim, sh_.dim);
          if (sh_.scale != nullptr) s *= sc;
          Selector& sel = sels[q];
          if (s > sel.thr) {
            sel.push(s, doc);
            thr_[q] = sel.thr;
          }
        }
      }
    }
  }

  const Shared<T>& sh_;
  std::vector<uint16_t> abuf_;
  std::vector<float> dnorm_;
  std::vector<float> thr_;  // mirror of the selectors' thresholds, vector-loadable
  alignas(64) float cbuf_[32 * 32];
};

}  // namespace amx
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

bool amx_usable_impl() {
  // AMX-TILE and AMX-BF16 (CPUID.7.0:EDX bits 24, 22), the AVX-512 kernels around them, and Linux's permission
  // to use the tile data state (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA), granted once per process.
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  if (!(d & (1u << 24)) || !(d & (1u << 22)) || best_cpu_isa() != Isa::avx512) return false;
  return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
}
#else
bool amx_usable_impl() { return false; }
#endif

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

// Searches queries [qa, qb) against docs [lo, hi) tile by tile -- pass(t0, t1, selectors) scores a tile and feeds
// the selectors -- and hands each query's sorted best min(k, hi - lo) to emit(q, hits, m).
// Memory: (qb - qa) selectors of selector_cap Hits, plus the pass's scratch.
template <class Pass, class Emit>
void search_range(Pass& pass, int64_t qa, int64_t qb, int64_t lo, int64_t hi, int64_t k, int64_t tile_n, Emit&& emit) {
  const int64_t nq = qb - qa, cap = selector_cap(k, hi - lo);
  std::vector<Hit> store(static_cast<size_t>(nq * cap));
  std::vector<Selector> sels(static_cast<size_t>(nq));
  for (int64_t i = 0; i < nq; ++i) sels[i] = Selector{store.data() + i * cap, 0, cap, k, kNegInf};
  for (int64_t t0 = lo; t0 < hi; t0 += tile_n) pass(t0, std::min(hi, t0 + tile_n), sels.data());
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

// Threads over queries (split 2) or over doc partitions merged per query at the end (split 1).
// make_pass(qa, qb) builds a thread's pass (with its scratch) inside the thread that runs it.
template <class MakePass>
void drive(int64_t nq, int64_t nb, int64_t k, int threads, int split, int64_t parts, int64_t tile_n, float* scores,
           int64_t* ids, MakePass&& make_pass) {
  ErrorSink errors;
  if (split == 2) {
    const int64_t chunks = std::min<int64_t>(threads, nq);
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int64_t c = 0; c < chunks; ++c) {
      errors.run([&] {
        const int64_t qa = nq * c / chunks, qb = nq * (c + 1) / chunks;
        auto pass = make_pass(qa, qb);
        search_range(*pass, qa, qb, 0, nb, k, tile_n,
                     [&](int64_t q, const Hit* hits, int64_t m) { write_row(hits, m, scores + q * k, ids + q * k); });
      });
    }
    errors.rethrow();
    return;
  }
  parts = std::min<int64_t>(parts > 0 ? parts : threads, nb);
  std::vector<Hit> partial(static_cast<size_t>(parts * nq * k));
  std::vector<int64_t> plen(static_cast<size_t>(parts));
#pragma omp parallel for num_threads(threads) schedule(static, 1)
  for (int64_t p = 0; p < parts; ++p) {
    errors.run([&] {
      const int64_t lo = nb * p / parts, hi = nb * (p + 1) / parts;
      plen[p] = std::min(k, hi - lo);
      auto pass = make_pass(0, nq);
      search_range(*pass, 0, nq, lo, hi, k, tile_n, [&](int64_t q, const Hit* hits, int64_t m) {
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

// The fused path's per-thread pass: SIMD register blocks over a tile, scores through a small buffer.
template <class T>
class FusedPass {
 public:
  FusedPass(TilePassFn<T> fn, const float* queries, int64_t qa, int64_t qb, const T* docs, const float* scale,
            int64_t dim, int64_t tile_n)
      : fn_(fn), queries_(queries), qa_(qa), qb_(qb), docs_(docs), scale_(scale), dim_(dim),
        sbuf_(static_cast<size_t>(4 * tile_n)),  // 4 >= the query block of every ISA
        // fp32 copy of a tile of fp16/bf16/int8 docs, for when several query blocks share it.
        wide_(std::is_same<T, float>::value || qb - qa <= 2 ? 0 : static_cast<size_t>(tile_n * dim)) {}
  void operator()(int64_t t0, int64_t t1, Selector* sels) {
    fn_(queries_, qa_, qb_, docs_, scale_, t0, t1, dim_, sbuf_.data(), wide_.empty() ? nullptr : wide_.data(), sels);
  }

 private:
  TilePassFn<T> fn_;
  const float* queries_;
  int64_t qa_, qb_;
  const T* docs_;
  const float* scale_;
  int64_t dim_;
  std::vector<float> sbuf_, wide_;
};

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

bool amx_usable() {
  static const bool ok = amx_usable_impl();
  return ok;
}

template <class T>
void topk_ip_cpu(const float* queries, const T* docs, const float* scale, int64_t nq, int64_t nb, int64_t dim,
                 int64_t k, float* scores, int64_t* ids, const CpuOptions& opt) {
  if (nq < 0 || nb < 1 || dim < 1 || k < 1 || k > nb)
    throw std::invalid_argument("topk_ip: bad sizes nq=" + std::to_string(nq) + " nb=" + std::to_string(nb) +
                                " dim=" + std::to_string(dim) + " k=" + std::to_string(k));
  if (opt.threads < 1 || opt.tile_n < 0 || opt.split < 0 || opt.split > 2 || opt.parts < 0 || opt.path < 0 ||
      opt.path > 2)
    throw std::invalid_argument("topk_ip: bad options");
  if (nq == 0) return;
  const Isa isa = checked_isa(opt.isa);
  const int threads = opt.threads;
  bool use_amx = opt.path == 2;
  if (use_amx && !amx_usable())
    throw std::invalid_argument("topk_ip: path=prefilter needs AMX (AMX-TILE, AMX-BF16, Linux), not available here");
  if (opt.path == 0) use_amx = nq >= kAmxMinQ && amx_usable();

#if defined(PYRAG_X86) && defined(__linux__)
  if (use_amx) {
    // Threads split the docs: each converts only its own rows to bf16, and all queries share each tile.
    const int64_t dp = (dim + 31) / 32 * 32, kbs = dp / 32, qpairs = (nq + 31) / 32;
    std::vector<uint16_t> qv(static_cast<size_t>(qpairs * 2 * kbs * 512));
    amx::pack_queries(queries, nq, dim, qpairs * 2, kbs, qv.data());
    std::vector<float> qc(static_cast<size_t>(qpairs * 32), 0.0f), e0(qc.size(), 0.0f), dlim(qc.size(), 0.0f);
    double smax = 1.0;
    if (scale != nullptr)
      for (int64_t i = 0; i < nb; ++i) smax = std::max(smax, std::fabs(static_cast<double>(scale[i])));
    const double u = std::ldexp(1.0, -24), r = std::ldexp(1.0, -8), tiny = std::ldexp(1.0, -100);
    const double g = dim * u / (1 - dim * u), sd = std::sqrt(static_cast<double>(dim));
    const bool exact_docs = std::is_same<T, bf16_t>::value || std::is_same<T, int8_t>::value;
    const double c = 1.01 * ((exact_docs ? r : r * (2 + r)) + 2 * g * (1 + r) * (1 + r) + g + 4 * u);
    const auto up = [](double x) {  // fp32 >= x
      const float f = static_cast<float>(x);
      return static_cast<double>(f) >= x ? f : std::nextafter(f, std::numeric_limits<float>::infinity());
    };
    for (int64_t i = 0; i < nq; ++i) {
      double ss = 0.0;
      for (int64_t j = 0; j < dim; ++j) ss += static_cast<double>(queries[i * dim + j]) * queries[i * dim + j];
      const double qn = std::sqrt(ss) * (1.0 + 1e-12);
      qc[i] = up(c * qn + tiny * sd);
      e0[i] = up(tiny * (dim + sd * qn) * smax);
      const float lim = static_cast<float>(std::ldexp(1.0, 126) / std::max(qn, 1e-300) * (1.0 - 1e-6));
      dlim[i] = lim;  // rounding may go up by half an ulp; the 1e-6 margin keeps it below 2^126 / |q|
    }
    const amx::Shared<T> sh{queries, docs, scale, nq, dim, dp, kbs, qpairs, qv.data(), qc.data(), e0.data(),
                            dlim.data(), exact_kernel<T>(isa)};
    const int64_t tile_n = opt.tile_n > 0 ? (opt.tile_n + 31) / 32 * 32 : kAmxTile;
    drive(nq, nb, k, threads, 1, opt.parts, tile_n, scores, ids,
          [&](int64_t, int64_t) { return std::make_unique<amx::Pass<T>>(sh, tile_n); });
    return;
  }
#endif
  const TilePassFn<T> fn = tile_kernel<T>(isa);
  // Default tile: ~192 KiB of doc rows, so a tile read from DRAM by the first query block is served from L2 to
  // the others; a multiple of 24 so every register-block width (8, 6, 4, 3) divides it.
  int64_t tile_n = opt.tile_n;
  if (tile_n == 0)
    tile_n = std::clamp<int64_t>((192 << 10) / (dim * static_cast<int64_t>(sizeof(T))) / 24 * 24, 24, 4080);
  int split = opt.split;
  if (split == 0) {
    // Few queries: reading the docs dominates, so each thread streams its own slice of docs once (then a cheap
    // merge). Many queries: arithmetic dominates, so threads take query slices and share nothing; so do tiny
    // corpora where a doc slice per thread would be too short to amortise the per-thread setup.
    split = (threads == 1 || nq >= 32 * threads || nb < 4096 * threads) ? 2 : 1;
  }
  drive(nq, nb, k, threads, split, opt.parts, tile_n, scores, ids, [&](int64_t qa, int64_t qb) {
    return std::make_unique<FusedPass<T>>(fn, queries, qa, qb, docs, scale, dim, tile_n);
  });
}

template void topk_ip_cpu<float>(const float*, const float*, const float*, int64_t, int64_t, int64_t, int64_t, float*,
                                 int64_t*, const CpuOptions&);
template void topk_ip_cpu<half_t>(const float*, const half_t*, const float*, int64_t, int64_t, int64_t, int64_t,
                                  float*, int64_t*, const CpuOptions&);
template void topk_ip_cpu<bf16_t>(const float*, const bf16_t*, const float*, int64_t, int64_t, int64_t, int64_t,
                                  float*, int64_t*, const CpuOptions&);
template void topk_ip_cpu<int8_t>(const float*, const int8_t*, const float*, int64_t, int64_t, int64_t, int64_t,
                                  float*, int64_t*, const CpuOptions&);

}  // namespace pyrag::topk
