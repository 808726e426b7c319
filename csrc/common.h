// Small shared pieces of the framework-free kernels: the dtype codes the Python ops pass, and
// fp16/bf16 <-> fp32 conversion on the CPU (CUDA code uses cuda_fp16.h / cuda_bf16.h instead).
#pragma once

#include <cstdint>
#include <cstring>

namespace pyrag {

// Must match pyrag/ops/_common.py DTYPE_CODES.
enum class DType : int { f32 = 0, f16 = 1, bf16 = 2, i8 = 3 };

struct alignas(2) half_t { uint16_t bits; };
struct alignas(2) bf16_t { uint16_t bits; };

inline float to_float(float x) { return x; }

inline float to_float(bf16_t x) {
  uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline float to_float(half_t x) {
  const uint32_t h = x.bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (mant << 13);  // inf / nan
  } else if (exp != 0) {
    u = sign | ((exp + 112u) << 23) | (mant << 13);
  } else if (mant == 0) {
    u = sign;
  } else {  // subnormal half -> normal float
    exp = 113;
    while ((mant & 0x400u) == 0) {
      mant <<= 1;
      --exp;
    }
    mant &= 0x3ffu;
    u = sign | (exp << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline void from_float(float v, float* out) { *out = v; }

inline void from_float(float v, bf16_t* out) {  // round to nearest even, NaN kept NaN
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    out->bits = static_cast<uint16_t>((u >> 16) | 0x40u);
    return;
  }
  u += 0x7fffu + ((u >> 16) & 1u);
  out->bits = static_cast<uint16_t>(u >> 16);
}

inline void from_float(float v, half_t* out) {  // round to nearest even
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t absu = u & 0x7fffffffu;
  if (absu > 0x7f800000u) { out->bits = static_cast<uint16_t>(sign | 0x7e00u); return; }
  if (absu >= 0x477ff000u) { out->bits = static_cast<uint16_t>(sign | 0x7c00u); return; }  // overflow -> inf
  if (absu < 0x38800000u) {  // subnormal or zero in half
    if (absu < 0x33000000u) { out->bits = static_cast<uint16_t>(sign); return; }
    const uint32_t e = absu >> 23;
    const uint32_t m = (absu & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - e;  // 14 - (e - 112)
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1);
    const uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    out->bits = static_cast<uint16_t>(sign | r);
    return;
  }
  uint32_t r = absu - 0x38000000u;  // rebias exponent 127 -> 15
  r += 0xfffu + ((r >> 13) & 1u);
  out->bits = static_cast<uint16_t>(sign | (r >> 13));
}

}  // namespace pyrag
