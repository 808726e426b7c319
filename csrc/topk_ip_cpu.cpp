// CPU kernels of pyrag.topk_ip: tiled dot products fused with per-query threshold-filtered top-k buffers, OpenMP
// over docs (few queries: memory bound) or queries (many), SIMD kernels picked at run time, and an AMX bf16
// prefilter with exact fp32 rescoring for many queries on CPUs that have AMX.
#include "topk_ip.h"
#include "topk_ip_vnni.h"

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
  // Best min(k, hi - lo) of docs [lo, hi) into out, sorted if `sorted`; returns how many.
  int64_t finish(int64_t lo, int64_t hi, Hit* out, bool sorted) {
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
    // Select, then sort only the winners: std::partial_sort is a heap sort, ~4x slower once m reaches thousands.
    if (count > m) std::nth_element(buf, buf + (m - 1), buf + count, better);
    if (sorted) std::sort(buf, buf + m, better);
    std::copy(buf, buf + m, out);
    return m;
  }
};

// Capacity of a selector that will see `len` docs is min(k + slack, len + 1): a stream no longer than the buffer
// never compacts (len + 1 keeps the `++count == cap` test from firing). The fused path takes slack = max(k, 64),
// amortising compaction to O(1) per admitted doc; the prefilter paths (AMX, sketch), where every admission costs an
// exact dot product, take a smaller slack so that the threshold follows the true k-th score more closely.
inline int64_t fused_slack(int64_t k) { return std::max(k, int64_t{64}); }
inline int64_t rescore_slack(int64_t k) { return std::max(k / 4, int64_t{16}); }

template <class T>
using TilePassFn = void (*)(const float*, int64_t, int64_t, const T*, const float*, int64_t, int64_t, int64_t, float*,
                            float*, Selector*);
template <class T>
using ExactFn = void (*)(const float* const*, const T* const*, int, int64_t, float*);
template <class T>
using ScoreFn = void (*)(const float*, int64_t, int64_t, const T*, int64_t, int64_t, float*, float*);

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

// get(kernels) with the Kernels table of the ISA: one switch for every entry point.
template <class Get>
auto by_isa(Isa isa, Get get) {
  switch (isa) {
#if defined(PYRAG_X86)
    case Isa::avx512: return get(avx512::Kernels{});
    case Isa::avx2: return get(avx2::Kernels{});
#endif
    default: return get(scalar::Kernels{});
  }
}

template <class T>
TilePassFn<T> tile_kernel(Isa isa) {
  return by_isa(isa, [](auto ks) { return decltype(ks)::template tile<T>(); });
}
template <class T>
ExactFn<T> exact_kernel(Isa isa) {
  return by_isa(isa, [](auto ks) { return decltype(ks)::template exact<T>(); });
}
template <class T>
ScoreFn<T> score_kernel(Isa isa) {
  return by_isa(isa, [](auto ks) { return decltype(ks)::template score<T>(); });
}

// ---- the AMX bf16 prefilter (large Q on CPUs with AMX) ----
// Exact fp32 search at large Q is a GEMM at the FMA peak (~32 FMA/cycle/core); FAISS and torch already run there,
// so no fp32 kernel can beat them by much. AMX multiplies bf16 tiles many times faster. This path scores every doc
// with AMX (queries and docs rounded to bf16, fp32 accumulation), bounds the gap to the exact fp32 score
// rigorously, and computes the exact score -- with the fused path's own dot arithmetic -- only for docs whose
// approximate score + bound reaches the query's current k-th exact score. Every other doc provably cannot enter
// the top k, so the result is bit-identical to the fused path. On typical data a few hundred to a few thousand
// docs per query are rescored; where many docs tie within the bound (near-duplicate corpora) it degrades towards
// the fused cost. The bound, with q' and d' the bf16 roundings, u = 2^-24, g = D u / (1 - D u):
//   |q'.d' - q.d| = |(q' - q).d' + q.(d' - d)| <= |q' - q| (|d| + |d' - d|) + |q| |d' - d|     (Cauchy-Schwarz)
//   AMX's fp32 accumulation <= 2 g (1 + 2^-8)^2 |q||d|, the fp32 kernel's own error <= g |q||d|,
// with the residual norms |q' - q|, |d' - d| measured (not the worst case 2^-8 |q|), all rounded up, times 1.01,
// plus 8 u |q||d| for the fp32 evaluation of the test itself and int8's scale products, plus
// 2^-100 (D + sqrt(D) (|q| + |d|)) for denormals the AMX unit flushes to zero. The analysis assumes no overflow,
// which |q||d| <= 2^126 guarantees for every partial sum in any order; docs beyond that are always rescored.
// Measured crossover (fused ahead at 32 queries, AMX at 64): below it the fused kernel is memory bound and the
// conversion to bf16 only adds work.
constexpr int64_t kAmxMinQ = 48;
// ... and from this many docs: on fewer, rescoring k + slack candidates of every query and the per-query bound cost
// more than the bf16 scoring saves (measured, 2 threads: Q=1000, N=100, D=768 2.3x slower than fused; Q=20000,
// N=2000, D=128 1.14x; N=2000, D=768 even; N=5000, D=384 1.12x faster; N=8000, D=768 1.6x faster).
constexpr int64_t kAmxMinN = 4096;
// ... and only where k is small next to N: every query rescores at least k + slack docs exactly (scattered rows,
// one at a time) on top of scoring all N in bf16, so a wide k costs more than the fused pass it replaces. Measured
// (2 threads, Q = 64 and 512): the two break even at N / k ~ 200 (D = 768) to ~ 400 (D = 128); at N / k = 24 the
// prefilter took 1.6-2.6x the fused time, at N / k = 5 about 3x.
constexpr int64_t kAmxMinDocsPerK = 256;
constexpr int64_t kAmxTile = 128;  // docs per tile: 192 KiB of bf16 rows at D = 768, L2-resident

bool amx_usable_impl();

// fp32 >= x.
inline float round_up(double x) {
  const float f = static_cast<float>(x);
  return static_cast<double>(f) >= x ? f : std::nextafter(f, std::numeric_limits<float>::infinity());
}

// Upper bounds on the queries' norms |q_i| (fp64 sums, rounded up), which every prefilter bound starts from.
inline std::vector<double> query_norms(const float* queries, int64_t nq, int64_t dim) {
  std::vector<double> qn(static_cast<size_t>(nq));
  for (int64_t i = 0; i < nq; ++i) {
    double ss = 0.0;
    for (int64_t j = 0; j < dim; ++j) ss += static_cast<double>(queries[i * dim + j]) * queries[i * dim + j];
    qn[i] = std::sqrt(ss) * vnni::fp64_slack(dim);
  }
  return qn;
}

// The prefilter bounds need D u well below 1 (they use g = D u / (1 - D u)); longer rows take the fused path.
constexpr int64_t kMaxPrefilterDim = int64_t{1} << 22;

// Whether int8 codes (|c| <= 127) against a query whose (quantised or bf16-rounded) norm is at most qbound could
// overflow an fp32 partial sum: |q| 127 sqrt(D) beyond 2^120. Such queries leave the sketch paths.
inline bool codes_may_overflow(double qbound, int64_t dim) {
  return qbound * 127.0 * std::sqrt(static_cast<double>(dim)) > std::ldexp(1.0, 120);
}

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

// GCC's _tile_loadconfig tells the compiler it reads 8 bytes of the config, so the stores of the rest can be
// dropped as dead (they were, at -O3); this asm reads the whole object.
inline void load_tile_config(const TileConfig& cfg) { __asm__ volatile("ldtilecfg %0" : : "m"(cfg)); }
// GCC's _tile_loadd does not declare that it reads memory: make earlier stores (the converted tile) visible.
inline void compiler_barrier() { __asm__ volatile("" : : : "memory"); }

inline uint16_t bf16_bits(float f) {
  bf16_t b;
  from_float(f, &b);
  return b.bits;
}
inline float bf16_value(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
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

// Doc rows [0, n) -> bf16 rows of stride dp (zero padded; rows n..n32 zeroed), dnorm[i] >= |d_i| and
// dres[i] >= |d_i - bf16(d_i)| (both of the dequantised row, i.e. times |scale[i]| for int8). The sums of squares
// run in fp32 (16 lanes, then the lanes and the tail), which with nonnegative terms errs by at most a factor
// 1 + g, g = (D/16 + 32) u / (1 - (D/16 + 32) u); squares and sums that underflow (or are flushed) lose at most
// 2^-126 each, so |d|^2 <= ss (1 + 2g) + (D + 32) 2^-126. A square that overflows makes the norm inf, and such a
// doc is always rescored.
// (fp64 sums, used before, took about a tenth of this path's time at 64 queries here; x - bf16(x) is exact in fp32.)
template <class T>
void convert_tile(const T* src, int64_t n, int64_t n32, int64_t dim, int64_t dp, uint16_t* dst, float* dnorm,
                  float* dres, const float* scale) {
  const double u = std::ldexp(1.0, -24), terms = static_cast<double>(dim / 16 + 32);
  const double grow = 1.0 + 2.0 * terms * u, floor_ss = terms * 16 * std::ldexp(1.0, -126);  // >= (D + 32) 2^-126
  for (int64_t r = 0; r < n; ++r) {
    const T* x = src + r * dim;
    uint16_t* y = dst + r * dp;
    __m512 nn = _mm512_setzero_ps(), rr = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= dim; i += 16) {
      const __m512 v = avx512::vload(x + i);
      // Round to nearest even on the bits (a signalling NaN may turn into inf; the NaN norm flags the row anyway).
      const __m512i bits = _mm512_castps_si512(v);
      const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
      const __m512i hi16 =
          _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i), _mm512_cvtepi32_epi16(hi16));
      const __m512 res = _mm512_sub_ps(v, _mm512_castsi512_ps(_mm512_slli_epi32(hi16, 16)));
      nn = _mm512_fmadd_ps(v, v, nn);
      rr = _mm512_fmadd_ps(res, res, rr);
    }
    float ss = _mm512_reduce_add_ps(nn), rs = _mm512_reduce_add_ps(rr);
    for (; i < dim; ++i) {
      float f;
      if constexpr (std::is_same<T, int8_t>::value) f = static_cast<float>(x[i]);
      else f = to_float(x[i]);
      y[i] = bf16_bits(f);
      const float e = f - bf16_value(y[i]);
      ss += f * f;
      rs += e * e;
    }
    std::memset(y + dim, 0, sizeof(uint16_t) * (dp - dim));
    const double sc = scale != nullptr ? std::fabs(static_cast<double>(scale[r])) : 1.0;
    // 1e-12 covers the fp64 square root and the two products below (a few roundings each).
    dnorm[r] = round_up(std::sqrt(static_cast<double>(ss) * grow + floor_ss) * (1.0 + 1e-12) * sc);
    dres[r] = round_up(std::sqrt(static_cast<double>(rs) * grow + floor_ss) * (1.0 + 1e-12) * sc);
  }
  for (int64_t r = n; r < n32; ++r) {
    std::memset(dst + r * dp, 0, sizeof(uint16_t) * dp);
    dnorm[r] = 0.0f;
    dres[r] = 0.0f;
  }
}

// int8 sketch codes [0, n) -> bf16 rows of stride dp (exact: |code| <= 127 fits bf16's 8 significant bits), and the
// per-doc bound inputs from the sketch: dnorm >= |d'| (d' = codes * scale, |d'| <= |d| + |d - d'|) and
// dres >= |d - d'|, so that the bound of convert_tile's callers covers the sketch's own error as well.
void convert_codes(const int8_t* src, int64_t n, int64_t n32, int64_t dim, int64_t dp, uint16_t* dst, float* dnorm,
                   float* dres, const float* norm, const float* res) {
  for (int64_t r = 0; r < n; ++r) {
    const int8_t* x = src + r * dim;
    uint16_t* y = dst + r * dp;
    int64_t i = 0;
    for (; i + 16 <= dim; i += 16) {
      const __m512 v = avx512::vload(x + i);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i),
                          _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(v), 16)));  // exact
    }
    for (; i < dim; ++i) y[i] = bf16_bits(static_cast<float>(x[i]));
    std::memset(y + dim, 0, sizeof(uint16_t) * (dp - dim));
    dnorm[r] = round_up(static_cast<double>(norm[r]) + static_cast<double>(res[r]));
    dres[r] = res[r];
  }
  for (int64_t r = n; r < n32; ++r) {
    std::memset(dst + r * dp, 0, sizeof(uint16_t) * dp);
    dnorm[r] = 0.0f;
    dres[r] = 0.0f;
  }
}

// Read-only inputs shared by the threads; per-query arrays are padded to qpairs * 32.
template <class T>
struct Shared {
  const float* queries;
  const T* docs;
  const float* scale;  // the exact scores' scale (int8 docs) or null
  // With a sketch (codes not null), AMX reads its codes instead of the docs, times ascale = the sketch's scale;
  // otherwise ascale = scale.
  const int8_t* codes;
  const float *ascale, *sk_norm, *sk_res;
  int64_t nq, dim, dp, kbs, qpairs;
  const uint16_t* qv;  // packed queries
  // bound(q, d) = ca * dnorm + cb * dres + e0 (ca = qres + qg, cb = qres + qnorm, see topk_ip_cpu); a doc is
  // always a candidate if dnorm > dlim.
  const float *ca, *cb, *e0, *dlim;
  ExactFn<T> exact;
};

// One thread's pass over doc tiles, for all queries: convert the tile, 2 x 2 blocks of 16 x 16 AMX tiles
// (32 docs x 32 queries, tmm0-3 accumulate, tmm4-5 docs, tmm6-7 queries), then the bound test per doc and query.
template <class T>
class Pass {
 public:
  Pass(const Shared<T>& sh, int64_t tile_n)
      : sh_(sh), abuf_(static_cast<size_t>(tile_n * sh.dp)), dnorm_(static_cast<size_t>(tile_n)),
        dres_(static_cast<size_t>(tile_n)), thr_(static_cast<size_t>(sh.qpairs * 32), kNegInf),
        cpart_(static_cast<size_t>(tile_n * 32)) {
    TileConfig cfg;
    std::memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; ++t) {
      cfg.colsb[t] = 64;
      cfg.rows[t] = 16;
    }
    load_tile_config(cfg);
  }
  ~Pass() { _tile_release(); }
  Pass(const Pass&) = delete;
  Pass& operator=(const Pass&) = delete;

  void operator()(int64_t t0, int64_t t1, Selector* sels) {
    const int64_t n = t1 - t0, n32 = (n + 31) / 32 * 32, dp = sh_.dp, blocks = n32 / 32;
    if (sh_.codes != nullptr)
      convert_codes(sh_.codes + t0 * sh_.dim, n, n32, sh_.dim, dp, abuf_.data(), dnorm_.data(), dres_.data(),
                    sh_.sk_norm + t0, sh_.sk_res + t0);
    else
      convert_tile(sh_.docs + t0 * sh_.dim, n, n32, sh_.dim, dp, abuf_.data(), dnorm_.data(), dres_.data(),
                   sh_.scale != nullptr ? sh_.scale + t0 : nullptr);
    compiler_barrier();
    // While AMX works on this tile, pull the next one (the next rows of this thread's range) towards L2: the
    // conversion above is then served from cache instead of waiting on DRAM.
    const char* next = sh_.codes != nullptr ? reinterpret_cast<const char*>(sh_.codes + t1 * sh_.dim)
                                            : reinterpret_cast<const char*>(sh_.docs + t1 * sh_.dim);
    const int64_t next_bytes = n * sh_.dim * static_cast<int64_t>(sh_.codes != nullptr ? 1 : sizeof(T));
    const int64_t steps = sh_.qpairs * ((sh_.kbs + kKChunk - 1) / kKChunk) * blocks;
    const int64_t per_step = (next_bytes / 64 + steps - 1) / steps;
    int64_t line = 0;
    const int stride = static_cast<int>(dp * 2);
    for (int64_t qp = 0; qp < sh_.qpairs; ++qp) {
      const uint16_t* b0 = sh_.qv + (2 * qp) * sh_.kbs * 512;
      const uint16_t* b1 = b0 + sh_.kbs * 512;
      // K in chunks of kKChunk x 32 dims: the chunk of the 32 queries' tiles (16 KiB) stays in L1 while every doc
      // block of the tile streams past it from L2; partial sums wait in cpart_ between chunks.
      for (int64_t kc = 0; kc < sh_.kbs; kc += kKChunk) {
        const int64_t kend = std::min(sh_.kbs, kc + kKChunk);
        for (int64_t blk = 0; blk < blocks; ++blk) {
          float* c = cpart_.data() + blk * 1024;  // [32 docs][32 queries]
          if (kc == 0) {
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
          } else {
            _tile_loadd(0, c, 128);
            _tile_loadd(1, c + 16, 128);
            _tile_loadd(2, c + 512, 128);
            _tile_loadd(3, c + 528, 128);
          }
          const uint16_t* a0 = abuf_.data() + blk * 32 * dp;
          const uint16_t* a1 = a0 + 16 * dp;
          for (int64_t kb = kc; kb < kend; ++kb) {
            _tile_loadd(4, a0 + kb * 32, stride);
            _tile_loadd(5, a1 + kb * 32, stride);
            _tile_loadd(6, b0 + kb * 512, 64);
            _tile_loadd(7, b1 + kb * 512, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
          }
          _tile_stored(0, c, 128);
          _tile_stored(1, c + 16, 128);
          _tile_stored(2, c + 512, 128);
          _tile_stored(3, c + 528, 128);
          for (int64_t e = 0; e < per_step && line * 64 < next_bytes; ++e, ++line)
            _mm_prefetch(next + line * 64, _MM_HINT_T1);
        }
      }
      for (int64_t blk = 0; blk < blocks; ++blk)
        select(cpart_.data() + blk * 1024, t0 + blk * 32, std::min<int64_t>(32, n - blk * 32), qp, blk * 32, sels);
    }
  }

 private:
  static constexpr int64_t kKChunk = 8;

  // Docs id0 + r (r < rows) against queries qp * 32 + [0, 32), approximate scores c[r][query]: first every
  // (doc, query) pair the bound cannot rule out (thresholds as they stand), then their exact scores in one batch
  // (independent FMA chains), then the selectors see them in doc order -- each still applies its own current
  // threshold, so the result is the same as testing one pair at a time.
  void select(const float* c, int64_t id0, int64_t rows, int64_t qp, int64_t j0, Selector* sels) {
    int npairs = 0;
    for (int h = 0; h < 2; ++h) {
      const int64_t qb = qp * 32 + h * 16;
      if (qb >= sh_.nq) break;
      const unsigned lanes = sh_.nq - qb < 16 ? (1u << (sh_.nq - qb)) - 1u : 0xffffu;
      const __m512 ca = _mm512_loadu_ps(sh_.ca + qb), cb = _mm512_loadu_ps(sh_.cb + qb);
      const __m512 e0 = _mm512_loadu_ps(sh_.e0 + qb), lim = _mm512_loadu_ps(sh_.dlim + qb);
      const __m512 thr = _mm512_loadu_ps(thr_.data() + qb);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t doc = id0 + r;
        const __m512 dn = _mm512_set1_ps(dnorm_[j0 + r]), dr = _mm512_set1_ps(dres_[j0 + r]);
        __m512 a = _mm512_loadu_ps(c + r * 32 + h * 16);
        if (sh_.ascale != nullptr) a = _mm512_mul_ps(a, _mm512_set1_ps(sh_.ascale[doc]));
        const __m512 ub = _mm512_add_ps(a, _mm512_fmadd_ps(ca, dn, _mm512_fmadd_ps(cb, dr, e0)));
        unsigned m = (_mm512_cmp_ps_mask(ub, thr, _CMP_NLT_UQ) | _mm512_cmp_ps_mask(dn, lim, _CMP_NLE_UQ)) & lanes;
        while (m) {
          const int q = static_cast<int>(qb) + __builtin_ctz(m);
          m &= m - 1;
          pq_[npairs] = q;
          pdoc_[npairs] = doc;
          qp_[npairs] = sh_.queries + q * sh_.dim;
          dp_[npairs++] = sh_.docs + doc * sh_.dim;
        }
      }
    }
    if (npairs == 0) return;
    // Pairs were collected half by half; the selectors need each query's docs in increasing order, which holds
    // within a half (rows ascending) and the halves hold different queries.
    sh_.exact(qp_, dp_, npairs, sh_.dim, ps_);
    for (int i = 0; i < npairs; ++i) {
      const int64_t doc = pdoc_[i];
      const float s = sh_.scale != nullptr ? ps_[i] * sh_.scale[doc] : ps_[i];
      Selector& sel = sels[pq_[i]];
      if (s > sel.thr) {
        sel.push(s, doc);
        thr_[pq_[i]] = sel.thr;
      }
    }
  }

  const Shared<T>& sh_;
  std::vector<uint16_t> abuf_;
  std::vector<float> dnorm_, dres_;
  std::vector<float> thr_;    // mirror of the selectors' thresholds, vector-loadable
  std::vector<float> cpart_;  // [tile blocks][32 docs][32 queries] partial / final approximate scores
  // Candidate pairs of one 32 x 32 block.
  int pq_[32 * 32];
  int64_t pdoc_[32 * 32];
  const float* qp_[32 * 32];
  const T* dp_[32 * 32];
  float ps_[32 * 32];
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
void search_range(Pass& pass, int64_t qa, int64_t qb, int64_t lo, int64_t hi, int64_t k, int64_t tile_n,
                  int64_t slack, bool sorted, Emit&& emit) {
  const int64_t nq = qb - qa, cap = std::min(k + slack, hi - lo + 1);
  std::vector<Hit> store(static_cast<size_t>(nq * cap));
  std::vector<Selector> sels(static_cast<size_t>(nq));
  for (int64_t i = 0; i < nq; ++i) sels[i] = Selector{store.data() + i * cap, 0, cap, k, kNegInf};
  for (int64_t t0 = lo; t0 < hi; t0 += tile_n) pass(t0, std::min(hi, t0 + tile_n), sels.data());
  std::vector<Hit> out(static_cast<size_t>(std::min(k, hi - lo)));
  for (int64_t i = 0; i < nq; ++i) {
    const int64_t m = sels[i].finish(lo, hi, out.data(), sorted);
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
void drive(int64_t nq, int64_t nb, int64_t k, int threads, int split, int64_t parts, int64_t tile_n, int64_t slack,
           float* scores, int64_t* ids, MakePass&& make_pass) {
  ErrorSink errors;
  if (split == 2) {
    const int64_t chunks = std::min<int64_t>(threads, nq);
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int64_t c = 0; c < chunks; ++c) {
      errors.run([&] {
        const int64_t qa = nq * c / chunks, qb = nq * (c + 1) / chunks;
        auto pass = make_pass(qa, qb);
        search_range(*pass, qa, qb, 0, nb, k, tile_n, slack, true,
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
      search_range(*pass, 0, nq, lo, hi, k, tile_n, slack, false, [&](int64_t q, const Hit* hits, int64_t m) {
        std::copy(hits, hits + m, partial.data() + (p * nq + q) * k);
      });
    });
  }
  errors.rethrow();
  // The partitions' lists are left unsorted (sorting each would cost parts * k log k per query where only the final
  // k need it: 1.7x the split-queries time at k = N / 2.4): a query's merge selects the best k of all of them, then
  // sorts those. Below 16Ki hits (~1 ms of selecting and sorting at most) it runs on this thread, sparing a second
  // parallel region -- whose start-up can cost milliseconds on a busy machine.
  const bool serial_merge = nq * parts * k <= (int64_t{1} << 14);
#pragma omp parallel for num_threads(threads) schedule(static) if (!serial_merge)
  for (int64_t q = 0; q < nq; ++q) {
    errors.run([&] {
      std::vector<Hit> all;
      all.reserve(static_cast<size_t>(parts * k));
      for (int64_t p = 0; p < parts; ++p) {
        const Hit* h = partial.data() + (p * nq + q) * k;
        all.insert(all.end(), h, h + plen[p]);
      }
      std::nth_element(all.begin(), all.begin() + (k - 1), all.end(), better);
      std::sort(all.begin(), all.begin() + k, better);
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

// ---- the int8 sketch prefilter (few queries over float docs that carry a Sketch) ----
// Few queries are memory bound: the fused path's time is the time to read the docs. With a sketch, every doc is
// scored against its int8 codes (a quarter of the fp32 bytes), and the exact score -- the fused path's own dot
// arithmetic, so the same bits -- is computed only for docs whose approximate score + bound reaches the query's
// current k-th exact score; the others provably cannot enter the top k. The bound, with d' = codes * scale,
// g = D u / (1 - D u), u = 2^-24, and the approximate score a = fl(fl(q . codes) * scale):
//   |a - q.d'| <= (g + 2u) |q| |d'| <= (g + 2u) |q| (|d| + |d - d'|),   |q.d' - q.d| <= |q| |d - d'|,
//   the fused kernel's own error <= g |q| |d|,
// plus 8u |q| (|d| + |d - d'|) for the fp32 evaluation of the test, all times 1.01, plus, for denormals flushed to
// zero (should the caller set FTZ/DAZ), 2^-100 (D + sqrt(D)) (|d| + |d - d'|) per doc (scale <= |d|, so a flushed
// product of the approximate score costs at most 2^-126 |d|) and 2^-100 (D + sqrt(D) |q|) per query. Docs beyond the
// overflow limit 2^126 / |q| are always rescored; a query so large that its approximate scores could overflow, or
// D >= 2^22 (where g is no longer small), sends the search to the fused path.
// The codes are scored with AVX-512 VNNI where the CPU has it (integer dot products with int8-quantised queries,
// csrc/topk_ip_vnni_cpu.cpp), else with the fp32 SIMD kernels. Measured on a 2-core AVX-512 + AMX machine
// (N = 200k, D = 768, k = 100; min of 9), fused / VNNI sketch / fp32-SIMD sketch (AVX2) / AMX sketch, ms:
//   1 query 28 / 9 / 10 / 36;  8: 43 / 27 / 54 / 41;  12: 51 / 31 / 55 / 37;  16: 57 / 37 / 73 / 39;
//   32: 88 / 68 / 152 / 53.
// Path 0 takes the SIMD sketch up to kSketchMaxQ queries (the fp32 variant loses to the fused path past about a
// dozen); beyond, the AMX prefilter over the codes where AMX exists, else the fused path.
constexpr int64_t kSketchMaxQ = 12;

template <class T>
struct SketchShared {
  const float* queries;
  const T* docs;
  Sketch sk;
  int64_t dim;
  const float *ca, *cb, *e0, *dlim;  // bound(q, d) = ca |d| + cb |d - d'| + e0; always a candidate if |d| > dlim
  ScoreFn<int8_t> score;              // fp32 queries x int8 codes (SIMD), or
  const vnni::QuantQueries* qq;       // int8-quantised queries x codes (AVX-512 VNNI) when not null
  ExactFn<T> exact;
};

// Per-query constants of the sketch bound; false (fused path then) if some query is too large for the int8 scores or
// D is too large for the error analysis. With VNNI scores (qq not null) the approximate score is of the quantised
// query q^ = q' * scale: the integer dot product is exact and three roundings follow, so with r = |q - q^| >= 0,
//   |a - q^.d'| <= 3.01u (|q| + r) (|d| + |d - d'|),   |q^.d' - q.d| <= r (|d| + |d - d'|) + |q| |d - d'|,
// and the same fused-kernel, evaluation (now 8u (|q| + r) (...)), margin and denormal terms as above.
inline bool sketch_bounds(const std::vector<double>& qnorm, int64_t dim, const vnni::QuantQueries* qq,
                          std::vector<float>& ca, std::vector<float>& cb, std::vector<float>& e0,
                          std::vector<float>& dlim) {
  if (dim >= kMaxPrefilterDim) return false;
  const int64_t nq = static_cast<int64_t>(qnorm.size());
  const double u = std::ldexp(1.0, -24), tiny = std::ldexp(1.0, -100), sd = std::sqrt(static_cast<double>(dim));
  const double g = dim * u / (1 - dim * u), up = 1.01 * (1 + 1e-6), flush = tiny * (dim + sd);
  ca.assign(nq, 0.0f);
  cb.assign(nq, 0.0f);
  e0.assign(nq, 0.0f);
  dlim.assign(nq, 0.0f);
  for (int64_t i = 0; i < nq; ++i) {
    const double qn = qnorm[i], r = qq != nullptr ? qq->res[i] : 0.0;
    if (codes_may_overflow(qn + r, dim)) return false;
    if (qq != nullptr) {
      ca[i] = round_up(up * (r + g * qn + 12 * u * (qn + r)) + flush);
      cb[i] = round_up(up * (qn + r + 12 * u * (qn + r)) + flush);
    } else {
      ca[i] = round_up(up * (2 * g + 10 * u) * qn + flush);
      cb[i] = round_up(up * (1 + g + 10 * u) * qn + flush);
    }
    e0[i] = round_up(tiny * (dim + sd * (qn + r)));
    dlim[i] = static_cast<float>(std::ldexp(1.0, 126) / std::max(qn, 1e-300) * (1.0 - 1e-6));
  }
  return true;
}

// One thread's pass over sketch tiles for queries [qa, qb): approximate scores of the tile's codes, the bound test
// against each selector's threshold as the tile starts (a stale, lower threshold only admits more), then exact
// scores of the candidates in batches (independent FMA chains), fed to the selector in doc order.
template <class T>
class SketchPass {
 public:
  SketchPass(const SketchShared<T>& sh, int64_t qa, int64_t qb, int64_t tile_n)
      : sh_(sh), qa_(qa), qb_(qb), approx_(static_cast<size_t>((qb - qa) * tile_n)),
        wide_(qb - qa > 4 && sh.qq == nullptr ? static_cast<size_t>(tile_n * sh.dim) : 0),
        cand_(static_cast<size_t>(tile_n)) {}
  void operator()(int64_t t0, int64_t t1, Selector* sels) {
    const int64_t n = t1 - t0, dim = sh_.dim;
    if (sh_.qq != nullptr)
      vnni::scores(*sh_.qq, qa_, qb_, sh_.sk.codes + t0 * dim, n, approx_.data());
    else
      sh_.score(sh_.queries, qa_, qb_, sh_.sk.codes + t0 * dim, n, dim, wide_.empty() ? nullptr : wide_.data(),
                approx_.data());
    const float *sc = sh_.sk.scale + t0, *dn = sh_.sk.norm + t0, *dr = sh_.sk.res + t0;
    for (int64_t q = qa_; q < qb_; ++q) {
      Selector& sel = sels[q - qa_];
      const float* a = approx_.data() + (q - qa_) * n;
      const float ca = sh_.ca[q], cb = sh_.cb[q], e0 = sh_.e0[q], lim = sh_.dlim[q], thr = sel.thr;
      int64_t nc = 0;
      for (int64_t j = 0; j < n; ++j) {
        const float ub = a[j] * sc[j] + (ca * dn[j] + (cb * dr[j] + e0));
        cand_[nc] = j;
        nc += (!(ub < thr) || dn[j] > lim) ? 1 : 0;  // NaN (overflowed) bounds are candidates too
      }
      rescore(q, t0, nc, sel);
    }
  }

 private:
  static constexpr int kBatch = 32;

  void rescore(int64_t q, int64_t t0, int64_t nc, Selector& sel) {
    const int64_t dim = sh_.dim;
    const float* qp = sh_.queries + q * dim;
    for (int64_t c0 = 0; c0 < nc; c0 += kBatch) {
      const int m = static_cast<int>(std::min<int64_t>(kBatch, nc - c0));
      for (int i = 0; i < m; ++i) {
        qs_[i] = qp;
        ds_[i] = sh_.docs + (t0 + cand_[c0 + i]) * dim;
      }
      sh_.exact(qs_, ds_, m, dim, es_);
      for (int i = 0; i < m; ++i)
        if (es_[i] > sel.thr) sel.push(es_[i], t0 + cand_[c0 + i]);
    }
  }

  const SketchShared<T>& sh_;
  int64_t qa_, qb_;
  std::vector<float> approx_, wide_;
  std::vector<int64_t> cand_;
  const float* qs_[kBatch];
  const T* ds_[kBatch];
  float es_[kBatch];
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

bool sketch_bound_constants(const float* queries, int64_t nq, int64_t dim, float* out) {
  if (nq < 0 || dim < 1)
    throw std::invalid_argument("sketch_bound_constants: bad sizes nq=" + std::to_string(nq) + " dim=" +
                                std::to_string(dim));
  std::vector<float> ca, cb, e0, dlim;
  if (!sketch_bounds(query_norms(queries, nq, dim), dim, nullptr, ca, cb, e0, dlim)) return false;
  for (int64_t i = 0; i < nq; ++i) {
    out[i] = ca[i];
    out[nq + i] = cb[i];
    out[2 * nq + i] = e0[i];
    out[3 * nq + i] = dlim[i];
  }
  return true;
}

template <class T>
void topk_ip_cpu(const float* queries, const T* docs, const float* scale, int64_t nq, int64_t nb, int64_t dim,
                 int64_t k, float* scores, int64_t* ids, const CpuOptions& opt, const Sketch* sketch) {
  if (nq < 0 || nb < 1 || dim < 1 || k < 1 || k > nb)
    throw std::invalid_argument("topk_ip: bad sizes nq=" + std::to_string(nq) + " nb=" + std::to_string(nb) +
                                " dim=" + std::to_string(dim) + " k=" + std::to_string(k));
  // tile_n beyond 2^20 docs would only fail later as an allocation of tile_n scores per query
  if (opt.threads < 1 || opt.tile_n < 0 || opt.tile_n > (int64_t{1} << 20) || opt.split < 0 || opt.split > 2 ||
      opt.parts < 0 || opt.path < 0 || opt.path > 3)
    throw std::invalid_argument(
        "topk_ip: bad options threads=" + std::to_string(opt.threads) + " tile_n=" + std::to_string(opt.tile_n) +
        " split=" + std::to_string(opt.split) + " parts=" + std::to_string(opt.parts) +
        " path=" + std::to_string(opt.path) +
        " (want threads >= 1, tile_n in [0, 2^20] (0 = auto), split 0-2, parts >= 0, path 0-3)");
  if (sketch != nullptr && (std::is_same<T, int8_t>::value || scale != nullptr))
    throw std::invalid_argument("topk_ip: a sketch is for float docs (int8 docs are already that compact)");
  if (opt.path == 3 && sketch == nullptr) throw std::invalid_argument("topk_ip: path=sketch needs a sketch");
  if (nq == 0) return;
  const Isa isa = checked_isa(opt.isa);
  const int threads = opt.threads;
  // Default split: few queries are memory bound, so each thread streams its own slice of docs once (then a cheap
  // merge); many queries are arithmetic bound, so threads take query slices and share nothing -- as do tiny
  // corpora, where a doc slice per thread would be too short to amortise the per-thread setup.
  const int split =
      opt.split != 0 ? opt.split : (threads == 1 || nq >= 32 * threads || nb < 4096 * threads) ? 2 : 1;
  // Both prefilters bound their error from the queries' norms: computed once, only when one of them may run.
  std::vector<double> qnorm;
  if (sketch != nullptr || opt.path == 2 || nq >= kAmxMinQ) qnorm = query_norms(queries, nq, dim);
  if (sketch != nullptr && (opt.path == 3 || (opt.path == 0 && nq <= kSketchMaxQ))) {
    std::vector<float> ca, cb, e0, dlim;
    // AVX-512 VNNI scores the codes in integers (when the SIMD level in use is AVX-512 and rows fit int32 sums).
    std::unique_ptr<vnni::QuantQueries> qq;
    if (isa == Isa::avx512 && dim <= vnni::kMaxDim && vnni::usable())
      qq = std::make_unique<vnni::QuantQueries>(vnni::quantize(queries, nq, dim));
    if (sketch_bounds(qnorm, dim, qq.get(), ca, cb, e0, dlim)) {
      const SketchShared<T> sh{queries,   docs,      *sketch,     dim, ca.data(), cb.data(), e0.data(),
                               dlim.data(), score_kernel<int8_t>(isa), qq.get(), exact_kernel<T>(isa)};
      const int64_t tile_n = opt.tile_n > 0 ? opt.tile_n : std::clamp<int64_t>((192 << 10) / dim / 24 * 24, 24, 4080);
      drive(nq, nb, k, threads, split, opt.parts, tile_n, rescore_slack(k), scores, ids,
            [&](int64_t qa, int64_t qb) { return std::make_unique<SketchPass<T>>(sh, qa, qb, tile_n); });
      return;
    }
  }
  bool use_amx = opt.path == 2;
  if (use_amx && !amx_usable())
    throw std::invalid_argument("topk_ip: path=prefilter needs AMX (AMX-TILE, AMX-BF16, Linux), not available here");
  // With a sketch, AMX reads the codes (a quarter of fp32's bytes) and wins from the first query count the SIMD
  // sketch path leaves (measured, N = 200k, D = 768: 16 queries 43 ms vs 58 fused, 64: 75 vs 100 AMX on the docs).
  if (opt.path == 0)
    use_amx = (nq >= kAmxMinQ || (sketch != nullptr && nq > kSketchMaxQ)) && nb >= kAmxMinN &&
              nb / kAmxMinDocsPerK >= k && amx_usable();
  if (dim >= kMaxPrefilterDim) use_amx = false;
  // Over a sketch, AMX sums bf16(q) . codes in fp32, and codes reach 127 whatever the row's size, so the doc-norm
  // overflow limit below does not cover these sums (|bf16(q)| <= |q| (1 + 2^-8)).
  if (use_amx && sketch != nullptr)
    for (int64_t i = 0; i < nq && use_amx; ++i) use_amx = !codes_may_overflow(qnorm[i] * (1.0 + 0x1p-8), dim);

#if defined(PYRAG_X86) && defined(__linux__)
  if (use_amx) {
    // Threads split the docs: each converts only its own rows to bf16, and all queries share each tile.
    const int64_t dp = (dim + 31) / 32 * 32, kbs = dp / 32, qpairs = (nq + 31) / 32;
    std::vector<uint16_t> qv(static_cast<size_t>(qpairs * 2 * kbs * 512));
    amx::pack_queries(queries, nq, dim, qpairs * 2, kbs, qv.data());
    const size_t padded = static_cast<size_t>(qpairs * 32);
    std::vector<float> ca(padded, 0.0f), cb(padded, 0.0f), e0(padded, 0.0f), dlim(padded, 0.0f);
    // With a sketch, AMX multiplies its int8 codes (exactly bf16) and scales by the sketch's scale; the bound then
    // takes |d'| + |d - d'| for |d| (convert_codes), which also covers the sketch's own error.
    const float* ascale = sketch != nullptr ? sketch->scale : scale;
    double smax = 1.0;
    if (ascale != nullptr)
      for (int64_t i = 0; i < nb; ++i) smax = std::max(smax, std::fabs(static_cast<double>(ascale[i])));
    const double u = std::ldexp(1.0, -24), r = std::ldexp(1.0, -8), tiny = std::ldexp(1.0, -100);
    const double g = dim * u / (1 - dim * u), sd = std::sqrt(static_cast<double>(dim));
    const double up = 1.01 * (1 + 1e-6);  // 1.01 margin; 1e-6 covers the fp32 evaluation of the bound
    const double coef_g = up * (2 * g * (1 + r) * (1 + r) + g) + 8 * u;
    for (int64_t i = 0; i < nq; ++i) {
      double rs = 0.0;
      for (int64_t j = 0; j < dim; ++j) {
        const float x = queries[i * dim + j];
        const double e = static_cast<double>(x) - amx::bf16_value(amx::bf16_bits(x));
        rs += e * e;
      }
      const double qn = qnorm[i], qr = std::sqrt(rs) * vnni::fp64_slack(dim);
      // bound = qr (|d| + |d - d'|) + qn |d - d'| + (coef_g qn + tiny sqrt(D)) |d| + e0
      //       = (qr + coef_g qn + tiny sqrt(D)) |d| + (qr + qn) |d - d'| + e0.
      ca[i] = round_up(up * qr + coef_g * qn + tiny * sd);
      cb[i] = round_up(up * (qr + qn));
      e0[i] = round_up(tiny * (dim + sd * qn) * smax);
      // 2^126 / |q|, rounded down (the 1e-6 margin), so docs within it cannot overflow any partial sum.
      dlim[i] = static_cast<float>(std::ldexp(1.0, 126) / std::max(qn, 1e-300) * (1.0 - 1e-6));
    }
    const amx::Shared<T> sh{queries,
                            docs,
                            scale,
                            sketch != nullptr ? sketch->codes : nullptr,
                            ascale,
                            sketch != nullptr ? sketch->norm : nullptr,
                            sketch != nullptr ? sketch->res : nullptr,
                            nq,
                            dim,
                            dp,
                            kbs,
                            qpairs,
                            qv.data(),
                            ca.data(),
                            cb.data(),
                            e0.data(),
                            dlim.data(),
                            exact_kernel<T>(isa)};
    const int64_t tile_n = opt.tile_n > 0 ? (opt.tile_n + 31) / 32 * 32 : kAmxTile;
    drive(nq, nb, k, threads, 1, opt.parts, tile_n, rescore_slack(k), scores, ids,
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
  drive(nq, nb, k, threads, split, opt.parts, tile_n, fused_slack(k), scores, ids, [&](int64_t qa, int64_t qb) {
    return std::make_unique<FusedPass<T>>(fn, queries, qa, qb, docs, scale, dim, tile_n);
  });
}

template void topk_ip_cpu<float>(const float*, const float*, const float*, int64_t, int64_t, int64_t, int64_t, float*,
                                 int64_t*, const CpuOptions&, const Sketch*);
template void topk_ip_cpu<half_t>(const float*, const half_t*, const float*, int64_t, int64_t, int64_t, int64_t,
                                  float*, int64_t*, const CpuOptions&, const Sketch*);
template void topk_ip_cpu<bf16_t>(const float*, const bf16_t*, const float*, int64_t, int64_t, int64_t, int64_t,
                                  float*, int64_t*, const CpuOptions&, const Sketch*);
template void topk_ip_cpu<int8_t>(const float*, const int8_t*, const float*, int64_t, int64_t, int64_t, int64_t,
                                  float*, int64_t*, const CpuOptions&, const Sketch*);

}  // namespace pyrag::topk
