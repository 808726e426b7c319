// AVX-512 VNNI scores of int8 sketch codes against int8-quantised queries (see topk_ip_vnni.h). vpdpbusd multiplies
// unsigned by signed bytes, so the codes go in shifted to c + 128 (an XOR with 0x80) and q' . c is recovered as
// sum (c + 128) q' - 128 sum q'. Four products per 32-bit lane per instruction, 64 per register: a sixteenth of the
// fp32 path's instructions, and no conversions.
#include "topk_ip_vnni.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define PYRAG_VNNI_X86 1
#endif

namespace pyrag::topk::vnni {

QuantQueries quantize(const float* queries, int64_t nq, int64_t dim) {
  QuantQueries qq;
  qq.nq = nq;
  qq.dim = dim;
  qq.dp = (dim + 63) / 64 * 64;
  qq.q.assign(static_cast<size_t>(nq * qq.dp), 0);
  qq.qsum.assign(static_cast<size_t>(nq), 0);
  qq.scale.assign(static_cast<size_t>(nq), 0.0f);
  qq.res.assign(static_cast<size_t>(nq), 0.0);
  for (int64_t i = 0; i < nq; ++i) {
    const float* x = queries + i * dim;
    float m = 0.0f;
    for (int64_t j = 0; j < dim; ++j) m = std::max(m, std::fabs(x[j]));
    const float s = m / 127.0f;
    double rs = 0.0;
    int32_t sum = 0;
    for (int64_t j = 0; j < dim; ++j) {
      const float v = s > 0.0f ? std::nearbyint(x[j] / s) : 0.0f;
      const int8_t c = static_cast<int8_t>(std::clamp(v, -127.0f, 127.0f));
      qq.q[i * qq.dp + j] = c;
      sum += c;
      const double e = static_cast<double>(x[j]) - static_cast<double>(c) * static_cast<double>(s);  // exact
      rs += e * e;
    }
    qq.qsum[i] = sum;
    qq.scale[i] = s;
    qq.res[i] = std::sqrt(rs) * fp64_slack(dim);
  }
  return qq;
}

#if defined(PYRAG_VNNI_X86)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni")
#endif
namespace {

// QB queries x DB code rows: acc[i][j] += (c_j + 128) . q'_i over dp bytes (the row tail masked to zero codes, which
// meet zero query padding). PF: prefetch the next DB rows (the one-query case streams every row from DRAM).
template <int QB, int DB, bool PF>
inline void block(const int8_t* q, int64_t dp, const int32_t* qsum, const float* qscale, const int8_t* c, int64_t dim,
                  float* out, int64_t ldo) {
  __m512i acc[QB][DB];
#pragma GCC unroll 8
  for (int i = 0; i < QB; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < DB; ++j) acc[i][j] = _mm512_setzero_si512();
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t k = 0; k < dp; k += 64) {
    const int64_t left = dim - k;
    const __mmask64 m = left >= 64 ? ~__mmask64{0} : ((__mmask64{1} << left) - 1);
    __m512i cv[DB];
#pragma GCC unroll 8
    for (int j = 0; j < DB; ++j) {
      cv[j] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, c + j * dim + k), flip);
      if constexpr (PF) _mm_prefetch(reinterpret_cast<const char*>(c + (DB + j) * dim + k), _MM_HINT_T0);
    }
#pragma GCC unroll 8
    for (int i = 0; i < QB; ++i) {
      const __m512i qv = _mm512_loadu_si512(q + i * dp + k);
#pragma GCC unroll 8
      for (int j = 0; j < DB; ++j) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], cv[j], qv);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < QB; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < DB; ++j) {
      const int64_t dot = int64_t{_mm512_reduce_add_epi32(acc[i][j])} - 128 * int64_t{qsum[i]};
      out[i * ldo + j] = static_cast<float>(dot) * qscale[i];
    }
}

template <int QB>
void rows(const int8_t* q, int64_t dp, const int32_t* qsum, const float* qscale, const int8_t* codes, int64_t n,
          int64_t dim, float* out) {
  constexpr int DB = QB == 1 ? 8 : 4;
  int64_t j = 0;
  for (; j + DB <= n; j += DB) block<QB, DB, true>(q, dp, qsum, qscale, codes + j * dim, dim, out + j, n);
  for (; j < n; ++j) block<QB, 1, false>(q, dp, qsum, qscale, codes + j * dim, dim, out + j, n);
}

}  // namespace

void scores(const QuantQueries& qq, int64_t qa, int64_t qb, const int8_t* codes, int64_t n, float* out) {
  for (int64_t i = qa; i < qb;) {
    const int64_t nb = std::min<int64_t>(4, qb - i);
    const int8_t* q = qq.q.data() + i * qq.dp;
    const int32_t* qs = qq.qsum.data() + i;
    const float* sc = qq.scale.data() + i;
    float* o = out + (i - qa) * n;
    switch (nb) {
      case 1: rows<1>(q, qq.dp, qs, sc, codes, n, qq.dim, o); break;
      case 2: rows<2>(q, qq.dp, qs, sc, codes, n, qq.dim, o); break;
      case 3: rows<3>(q, qq.dp, qs, sc, codes, n, qq.dim, o); break;
      default: rows<4>(q, qq.dp, qs, sc, codes, n, qq.dim, o); break;
    }
    i += nb;
  }
}
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

bool usable() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vnni");
  }();
  return ok;
}
#else
void scores(const QuantQueries&, int64_t, int64_t, const int8_t*, int64_t, float*) {}
bool usable() { return false; }
#endif

}  // namespace pyrag::topk::vnni
