// Approximate scores of an int8 sketch with AVX-512 VNNI (csrc/topk_ip_vnni_cpu.cpp): queries quantised to int8,
// integer dot products (exact), one conversion to float. Used by the sketch prefilter of csrc/topk_ip_cpu.cpp, whose
// error bound then also covers the queries' quantisation.
#pragma once

#include <cstdint>
#include <vector>

namespace pyrag::topk::vnni {

// AVX-512 F/BW + VNNI present (and the OS saves the registers).
bool usable();

// Relative error bound of a sum of `terms` nonnegative fp64 values and its square root: (terms + 4) 2^-52.
inline double fp64_slack(int64_t terms) { return 1.0 + static_cast<double>(terms + 4) * 0x1p-52; }

// Longest rows the integer sums take: |sum (c + 128) q'| <= 255 * 127 * D stays below 2^31.
constexpr int64_t kMaxDim = (int64_t{1} << 16) - 1;

// Queries quantised per row: q'[i] = round(q[i] / scale) in [-127, 127] (scale = max |q| / 127), zero padded to
// dp = D rounded up to 64; qsum = sum q'; res >= |q - q' * scale| (fp64, rounded up).
struct QuantQueries {
  int64_t nq = 0, dim = 0, dp = 0;
  std::vector<int8_t> q;
  std::vector<int32_t> qsum;
  std::vector<float> scale;
  std::vector<double> res;
};
QuantQueries quantize(const float* queries, int64_t nq, int64_t dim);

// out[(i - qa) * n + j] = float(q'_i . codes_j) * scale_i for queries [qa, qb) and code rows codes[0, n) (row
// stride dim): the integer dot product is exact, then two roundings.
void scores(const QuantQueries& qq, int64_t qa, int64_t qb, const int8_t* codes, int64_t n, float* out);

}  // namespace pyrag::topk::vnni
