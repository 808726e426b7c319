// CUDA kernels of pyrag.topk_ip: one pass scores doc tiles (warp-per-doc dot products for few queries -- over an int8
// sketch first where the caller gives one --, WMMA tensor cores for fp16/bf16 docs, SIMT register tiles otherwise) and keeps a candidate list per (query, doc chunk); a
// second kernel merges the chunks' lists per query. Extra memory O(nq * k * chunks), never the [nq, nb] matrix.
#include "topk_ip_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace pyrag::topk {
namespace {

using u64 = unsigned long long;  // the type CUDA's 64-bit atomics take
constexpr int NT = 256;          // threads per block of every kernel here

// ---- sort keys -------------------------------------------------------------------------------------------------
// key = (order-preserving bits of the score) << 32 | ~id. A larger key is a better result: higher score, then lower
// id. Keys of one query are unique (ids are), so a radix select finds the exact k-th key and "key > threshold" is
// the whole admission rule, in any scan order. NaN becomes -inf and -0 becomes +0 (they compare equal as floats).
// Every real key is > 0, so a threshold of 0 admits everything.
__device__ __forceinline__ u64 make_key(float s, int64_t id) {
  if (s != s) s = -INFINITY;
  if (s == 0.0f) s = 0.0f;
  uint32_t b = __float_as_uint(s);
  b = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
  return (u64(b) << 32) | u64(~static_cast<uint32_t>(id));
}
__device__ __forceinline__ float key_score(u64 key) {
  uint32_t b = static_cast<uint32_t>(key >> 32);
  b = (b & 0x80000000u) ? (b & 0x7fffffffu) : ~b;
  return __uint_as_float(b);
}
__device__ __forceinline__ int64_t key_id(u64 key) { return static_cast<int64_t>(~static_cast<uint32_t>(key)); }

// ---- element conversion ----------------------------------------------------------------------------------------
__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(int8_t x) { return static_cast<float>(x); }

template <class T>
__device__ __forceinline__ T zero_of() { return T(0); }
template <>
__device__ __forceinline__ __half zero_of<__half>() { return __ushort_as_half(0); }
template <>
__device__ __forceinline__ __nv_bfloat16 zero_of<__nv_bfloat16>() { return __ushort_as_bfloat16(0); }

// 16 bytes of a doc row (streamed: read once, so evict-first) as fp32 values.
__device__ __forceinline__ void load16(const float* p, float* out) {
  const float4 v = __ldcs(reinterpret_cast<const float4*>(p));
  out[0] = v.x, out[1] = v.y, out[2] = v.z, out[3] = v.w;
}
__device__ __forceinline__ void load16(const __half* p, float* out) {
  const uint4 u = __ldcs(reinterpret_cast<const uint4*>(p));
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] & 0xffffu)));
    out[2 * i + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] >> 16)));
  }
}
__device__ __forceinline__ void load16(const __nv_bfloat16* p, float* out) {
  const uint4 u = __ldcs(reinterpret_cast<const uint4*>(p));
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {  // bf16 is the high half of an fp32
    out[2 * i] = __uint_as_float(w[i] << 16);
    out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}
// int8 -> float without I2F (a slow conversion unit on sm_90, which the sketch's code pass would saturate): byte b
// of w, biased to b + 128 by the xor, becomes the low mantissa byte of 2^23 (0x4b000000); subtracting 2^23 + 128
// leaves exactly the signed value.
__device__ __forceinline__ float int8_byte_to_float(uint32_t w, int i) {
  return __uint_as_float(__byte_perm(w ^ 0x80808080u, 0x4b000000u, 0x7640u + static_cast<unsigned>(i))) - 8388736.0f;
}
__device__ __forceinline__ void load16(const int8_t* p, float* out) {
  const uint4 u = __ldcs(reinterpret_cast<const uint4*>(p));
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 16; ++i) out[i] = int8_byte_to_float(w[i / 4], i % 4);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// ---- block-wide exact selection --------------------------------------------------------------------------------
struct SelectSmem {
  unsigned int hist[256];
  u64 prefix;
  int krem;
  int count;
};

// The k-th largest of the keys visit(i, key) yields for i in [0, n) (visit returns false for holes); needs at
// least k keys. Radix select, 8 bits per pass, histogram in shared memory. Every thread of the block calls it.
template <class Visit>
__device__ u64 block_kth_largest(Visit visit, int64_t n, int64_t k, SelectSmem& sm) {
  u64 prefix = 0, mask = 0;
  int64_t krem = k;
  for (int shift = 56; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += NT) sm.hist[i] = 0;
    __syncthreads();
    for (int64_t i = threadIdx.x; i < n; i += NT) {
      u64 x;
      if (visit(i, x) && (x & mask) == prefix) {
        // Scores of one query share their top bits, so most keys hit one bin: aggregate per warp first.
        const unsigned bin = static_cast<unsigned>(x >> shift) & 255u;
        const unsigned same = __match_any_sync(__activemask(), bin);
        if ((threadIdx.x & 31) == __ffs(same) - 1) atomicAdd(&sm.hist[bin], static_cast<unsigned>(__popc(same)));
      }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int64_t above = 0;
      int b = 255;
      for (; b > 0; --b) {
        if (above + sm.hist[b] >= krem) break;
        above += sm.hist[b];
      }
      sm.prefix = prefix | (u64(b) << shift);
      sm.krem = static_cast<int>(krem - above);
    }
    __syncthreads();
    prefix = sm.prefix;
    krem = sm.krem;
    mask |= u64(255) << shift;
    __syncthreads();  // everyone has read sm before the next pass resets it
  }
  return prefix;  // all 64 bits fixed: the k-th key itself
}

// Keeps the k best of buf[0, n) (n > k) in buf[0, k), unordered, staging through buf[cap, cap + k); returns the
// smallest kept key (the new admission threshold).
__device__ u64 block_compact(u64* buf, int64_t n, int64_t k, int64_t cap, SelectSmem& sm) {
  const u64 kth = block_kth_largest(
      [buf](int64_t i, u64& x) {
        x = buf[i];
        return true;
      },
      n, k, sm);
  if (threadIdx.x == 0) sm.count = 0;
  __syncthreads();
  for (int64_t i = threadIdx.x; i < n; i += NT) {
    const u64 x = buf[i];
    if (x >= kth) buf[cap + atomicAdd(&sm.count, 1)] = x;
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < k; i += NT) buf[i] = buf[cap + i];
  __syncthreads();
  return kth;
}

// ---- the fused search kernel -------------------------------------------------------------------------------------
struct Args {
  const float* q;        // [nq, dim] fp32
  const void* docs;      // [nb, dim]
  const float* scale;    // [nb] or null
  const void* qparts;    // [np, nq, dim] fp16/bf16 split queries (tensor-core path) or null
  const float* qmul;     // [nq] power-of-two score multipliers of the split queries, or null
  int64_t nq, nb, dim, k, cap, chunks, chunk_len;
  u64* keys;             // [nq, chunks, cap + k]
  int* counts;           // [nq, chunks]
  // Chunked-GEMM path: scores [nq, nb] (row stride ld_scores) computed by the caller for docs doc0 .. doc0 + nb;
  // the lists carry over between calls (first: start empty; last: cut to k for the merge; thr_g: thresholds).
  const float* scores = nullptr;
  int64_t ld_scores = 0, doc0 = 0;
  bool first = true, last = true;
  u64* thr_g = nullptr;  // [nq, chunks]
  // Sketch path (SketchGemv): codes [nb, dim] int8, the sketch's per-doc scale, norm and residual bounds [nb], and
  // the bound's constants [4, nq] (ca, cb, e0, dlim; see topk_ip.h sketch_bound_constants).
  const int8_t* codes = nullptr;
  const float *sk_scale = nullptr, *sk_norm = nullptr, *sk_res = nullptr, *coef = nullptr;
};

// Precomputed scores (chunked-GEMM path): the tile is a coalesced copy of a [BQ, BN] block of the score chunk.
struct Scores {
  static constexpr int BQ = 16, BN = 128;
  static size_t smem_bytes(int64_t) { return size_t(BQ) * BN * 4; }
  static __device__ void init(const Args&, unsigned char*, int64_t) {}
  static __device__ void tile(const Args& a, unsigned char* smem, int64_t q0, int64_t t0, int64_t hi, const u64*) {
    float* S = reinterpret_cast<float*>(smem);
    for (int e = threadIdx.x; e < BQ * BN; e += NT) {
      const int64_t qi = e / BN, j = t0 + e % BN;
      S[e] = (q0 + qi < a.nq && j < hi) ? __ldcs(a.scores + (q0 + qi) * a.ld_scores + j) : 0.0f;
    }
  }
};

// acc[qi][r] += q[qi][p + v] * dv[r][v] for v = 0 .. V-1 in order (V of a 16-byte piece at element p of each row).
template <int BQ, int R, int V>
__device__ __forceinline__ void fma_piece(const float* qs, int D, int p, const float (&dv)[R][V], float (&acc)[BQ][R]) {
#pragma unroll
  for (int qi = 0; qi < BQ; ++qi) {
#pragma unroll
    for (int v4 = 0; v4 < V; v4 += 4) {
      const float4 x = *reinterpret_cast<const float4*>(qs + qi * D + p + v4);
      const float xv[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
      for (int v = 0; v < 4; ++v)
#pragma unroll
        for (int r = 0; r < R; ++r) acc[qi][r] = fmaf(xv[v], dv[r][v4 + v], acc[qi][r]);
    }
  }
}

// Each lane's share of the dot products of BQ queries (fp32, in shared memory: qs[qi * D + p]) with R doc rows:
// lane L takes elements L*V .. L*V+V-1, then 32 V further on, and so on (V elements per 16-byte load with VEC, else
// V = 1), one fmaf per element in that order; warp_sum of acc[qi][r] is the score. The exact scores of Gemv and the
// rescoring of the sketch path both come from here, so a doc's score has the same bits on either path.
template <class T, int BQ, int R, bool VEC>
__device__ __forceinline__ void lane_dots(const float* qs, int D, const T* const (&rows)[R], int lane,
                                          float (&acc)[BQ][R]) {
#pragma unroll
  for (int qi = 0; qi < BQ; ++qi)
#pragma unroll
    for (int r = 0; r < R; ++r) acc[qi][r] = 0.0f;
  if constexpr (VEC && R <= 2) {
    // One or two rows (the sketch path's rescoring): issue up to U 16-byte loads of each row before the first fmaf
    // (a loop the compiler leaves serial at such short trip counts), then the same fmaf chain as below, in the same
    // order, so the scores keep their bits.
    constexpr int V = 16 / static_cast<int>(sizeof(T)), U = 4;
    for (int p0 = lane * V; p0 < D; p0 += U * 32 * V) {
      float dv[U][R][V];
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int r = 0; r < R; ++r)
          if (p0 + u * 32 * V < D) load16(rows[r] + p0 + u * 32 * V, dv[u][r]);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int p = p0 + u * 32 * V;
        if (p >= D) break;
        fma_piece<BQ, R, V>(qs, D, p, dv[u], acc);
      }
    }
  } else if constexpr (VEC) {
    constexpr int V = 16 / static_cast<int>(sizeof(T));
#pragma unroll 4  // several 16-byte loads of each row in flight: the Q=1 path is bandwidth bound
    for (int p = lane * V; p < D; p += 32 * V) {
      float dv[R][V];
#pragma unroll
      for (int r = 0; r < R; ++r) load16(rows[r] + p, dv[r]);
      fma_piece<BQ, R, V>(qs, D, p, dv, acc);
    }
  } else {
    for (int p = lane; p < D; p += 32) {
      float dv[R];
#pragma unroll
      for (int r = 0; r < R; ++r) dv[r] = to_f(rows[r][p]);
#pragma unroll
      for (int qi = 0; qi < BQ; ++qi) {
        const float x = qs[qi * D + p];
#pragma unroll
        for (int r = 0; r < R; ++r) acc[qi][r] = fmaf(x, dv[r], acc[qi][r]);
      }
    }
  }
}

// Few queries (memory bound): each warp computes 4 docs at a time against BQ queries held in shared memory; every
// lane reads 16-byte pieces of the doc rows (VEC) so loads are wide and coalesced.
template <class T, int BQ_, bool VEC>
struct Gemv {
  // One or two queries: 8 rows per warp at a time (twice the loads in flight) and 128-doc tiles (half the barriers).
  static constexpr int BQ = BQ_, BN = BQ_ <= 2 ? 128 : 64, R = BQ_ <= 2 ? 8 : 4;
  static size_t smem_bytes(int64_t dim) { return size_t(BQ) * BN * 4 + size_t(BQ) * size_t(dim) * 4; }
  static __device__ void init(const Args& a, unsigned char* smem, int64_t q0) {
    float* qs = reinterpret_cast<float*>(smem) + BQ * BN;
    for (int64_t i = threadIdx.x; i < BQ * a.dim; i += NT) {
      const int64_t qi = i / a.dim, p = i % a.dim;
      qs[i] = (q0 + qi < a.nq) ? a.q[(q0 + qi) * a.dim + p] : 0.0f;
    }
  }
  static __device__ void tile(const Args& a, unsigned char* smem, int64_t, int64_t t0, int64_t hi, const u64*) {
    float* S = reinterpret_cast<float*>(smem);
    const float* qs = S + BQ * BN;
    const T* docs = static_cast<const T*>(a.docs);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int D = static_cast<int>(a.dim);
#pragma unroll 1
    for (int g = 0; g < BN / 8 / R; ++g) {  // 8 warps, BN / 8 docs each, R at a time
      const int j0 = warp * (BN / 8) + g * R;
      const T* rows[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int64_t doc = t0 + j0 + r;
        rows[r] = docs + (doc < hi ? doc : t0) * a.dim;  // past the end: recompute a valid row, result unused
      }
      float acc[BQ][R];
      lane_dots<T, BQ, R, VEC>(qs, D, rows, lane, acc);
#pragma unroll
      for (int qi = 0; qi < BQ; ++qi)
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const float v = warp_sum(acc[qi][r]);
          if (lane == 0) S[qi * BN + j0 + r] = v;
        }
    }
  }
};

// Few queries over float docs that carry an int8 sketch (pyrag/ops/sketch.py): the GPU twin of the CPU's SketchPass.
// Each warp scores its docs against the codes (a quarter / half of fp32 / fp16 bytes) with lane_dots, and computes
// a doc's exact score -- lane_dots over the doc row, the Gemv arithmetic, so the same bits -- only when the
// approximate score plus the rigorous bound reaches some query's current threshold (the k-th key of the block's
// list, at the last cut) or the doc is beyond the overflow limit; every other doc provably cannot enter the top k
// and gets -inf, which the list never admits once a threshold exists (before one exists every doc is rescored).
// The bound's constants (ca, cb, e0, dlim per query) come from the CPU code (sketch_bound_constants): fp32 scoring
// of the codes in any summation order, as here.
template <class T, int BQ_, bool VEC>
struct SketchGemv {
  using Base = Gemv<T, BQ_, VEC>;
  static constexpr int BQ = BQ_, BN = Base::BN, R = Base::R;
  static size_t smem_bytes(int64_t dim) { return Base::smem_bytes(dim); }
  static __device__ void init(const Args& a, unsigned char* smem, int64_t q0) { Base::init(a, smem, q0); }
  static __device__ void tile(const Args& a, unsigned char* smem, int64_t q0, int64_t t0, int64_t hi,
                              const u64* thr) {
    float* S = reinterpret_cast<float*>(smem);
    const float* qs = S + BQ * BN;
    const T* docs = static_cast<const T*>(a.docs);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int D = static_cast<int>(a.dim);
    // 16-byte code loads need 16-byte rows (D % 16 == 0; the codes tensor itself is 256-byte aligned by torch).
    const bool cvec = D % 16 == 0 && reinterpret_cast<uintptr_t>(a.codes) % 16 == 0;
    float tq[BQ], ca[BQ], cb[BQ], e0[BQ], lim[BQ];
#pragma unroll
    for (int qi = 0; qi < BQ; ++qi) {
      const bool real = q0 + qi < a.nq;  // padding queries of the last tile never make a doc a candidate
      tq[qi] = !real ? INFINITY : thr[qi] == 0 ? -INFINITY : key_score(thr[qi]);
      const int64_t q = real ? q0 + qi : 0;
      ca[qi] = a.coef[q];
      cb[qi] = a.coef[a.nq + q];
      e0[qi] = a.coef[2 * a.nq + q];
      lim[qi] = real ? a.coef[3 * a.nq + q] : INFINITY;
    }
#pragma unroll 1
    for (int g = 0; g < BN / 8 / R; ++g) {
      const int j0 = warp * (BN / 8) + g * R;
      const int8_t* crows[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int64_t doc = t0 + j0 + r;
        crows[r] = a.codes + (doc < hi ? doc : t0) * a.dim;
      }
      float acc[BQ][R];
      if (cvec) lane_dots<int8_t, BQ, R, true>(qs, D, crows, lane, acc);
      else lane_dots<int8_t, BQ, R, false>(qs, D, crows, lane, acc);
      // Which of the R docs need their exact score (bit r of cand; the same on every lane: the butterfly sums and
      // the per-doc loads are identical across the warp). The rest get -inf.
      unsigned cand = 0;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int64_t doc = t0 + j0 + r;
        const int64_t d = doc < hi ? doc : t0;
        const float sc = a.sk_scale[d], dn = a.sk_norm[d], dr = a.sk_res[d];  // in flight during the shuffles
        bool c = false;
#pragma unroll
        for (int qi = 0; qi < BQ; ++qi) {
          const float approx = warp_sum(acc[qi][r]);  // every lane, before any branch
          const float ub = approx * sc + (ca[qi] * dn + (cb[qi] * dr + e0[qi]));
          c |= !(ub < tq[qi]) || dn > lim[qi];  // a NaN (overflowed) bound is a candidate too
        }
        if (doc < hi && c) {
          cand |= 1u << r;
        } else if (lane == 0) {
#pragma unroll
          for (int qi = 0; qi < BQ; ++qi) S[qi * BN + j0 + r] = -INFINITY;
        }
      }
      // Exact scores of the candidates, two rows at a time (lane_dots' per-row arithmetic does not depend on how
      // many rows it takes), so one copy of the rescoring code serves every r.
      while (cand != 0) {
        const int r0 = __ffs(cand) - 1;
        cand &= cand - 1;
        if (cand != 0) {
          const int r1 = __ffs(cand) - 1;
          cand &= cand - 1;
          const T* rows[2] = {docs + (t0 + j0 + r0) * a.dim, docs + (t0 + j0 + r1) * a.dim};
          float ex[BQ][2];
          lane_dots<T, BQ, 2, VEC>(qs, D, rows, lane, ex);
#pragma unroll
          for (int qi = 0; qi < BQ; ++qi) {
            const float v0 = warp_sum(ex[qi][0]), v1 = warp_sum(ex[qi][1]);
            if (lane == 0) {
              S[qi * BN + j0 + r0] = v0;
              S[qi * BN + j0 + r1] = v1;
            }
          }
        } else {
          const T* rows[1] = {docs + (t0 + j0 + r0) * a.dim};
          float ex[BQ][1];
          lane_dots<T, BQ, 1, VEC>(qs, D, rows, lane, ex);
#pragma unroll
          for (int qi = 0; qi < BQ; ++qi) {
            const float v = warp_sum(ex[qi][0]);
            if (lane == 0) S[qi * BN + j0 + r0] = v;
          }
        }
      }
    }
  }
};

// Many queries, fp32/int8 docs: classic shared-memory tiles (BK-deep slices of 64 queries and 64 docs, converted
// to fp32) with a 4x4 register tile per thread. The tiles alias the score tile S, written after the last slice.
template <class T>
struct Simt {
  static constexpr int BQ = 64, BN = 64, BK = 16;
  static size_t smem_bytes(int64_t) { return size_t(BQ) * BN * 4; }
  static __device__ void init(const Args&, unsigned char*, int64_t) {}
  static __device__ void tile(const Args& a, unsigned char* smem, int64_t q0, int64_t t0, int64_t hi,
                              const u64*) {
    float* S = reinterpret_cast<float*>(smem);
    float* Qs = S;            // [BK][BQ]
    float* Ds = S + BK * BQ;  // [BK][BN]
    const T* docs = static_cast<const T*>(a.docs);
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    const int lr = threadIdx.x / 4, lc = (threadIdx.x % 4) * 4;  // loader: one row, four columns
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
    for (int64_t k0 = 0; k0 < a.dim; k0 += BK) {
      const int64_t qrow = q0 + lr, drow = t0 + lr;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t kk = k0 + lc + i;
        Qs[(lc + i) * BQ + lr] = (qrow < a.nq && kk < a.dim) ? a.q[qrow * a.dim + kk] : 0.0f;
        Ds[(lc + i) * BN + lr] = (drow < hi && kk < a.dim) ? to_f(docs[drow * a.dim + kk]) : 0.0f;
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < BK; ++kk) {
        const float4 qa = *reinterpret_cast<const float4*>(Qs + kk * BQ + ty * 4);
        const float4 db = *reinterpret_cast<const float4*>(Ds + kk * BN + tx * 4);
        const float qv[4] = {qa.x, qa.y, qa.z, qa.w}, dv[4] = {db.x, db.y, db.z, db.w};
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(qv[i], dv[j], acc[i][j]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) S[(ty * 4 + i) * BN + tx * 4 + j] = acc[i][j];
  }
};

// Many queries, fp16/bf16 docs: WMMA tensor cores (16x16x16, fp32 accumulation). An fp32 query is split into NP
// parts of the doc dtype (fp16: hi + lo after a power-of-two rescale into fp16 range; bf16: hi + mid + lo), so
// q . d = sum_p part_p . d keeps ~fp32 query precision while the docs stay in their storage dtype.
// 8 warps as 2 x 4, each owning a 32 x 32 block of the 64 x 128 score tile.
template <class T, int NP, bool VEC>
struct Wmma {
  static constexpr int BQ = 64, BN = 128, BK = 32, LD = BK + 8;  // +8: skew rows across shared-memory banks
  static size_t smem_bytes(int64_t) {
    return std::max(size_t(BQ) * BN * 4, size_t(NP * BQ * LD + BN * LD) * sizeof(T));
  }
  static __device__ void init(const Args&, unsigned char*, int64_t) {}
  static __device__ void tile(const Args& a, unsigned char* smem, int64_t q0, int64_t t0, int64_t hi,
                              const u64*) {
    using namespace nvcuda;
    T* As = reinterpret_cast<T*>(smem);  // [NP][BQ][LD]
    T* Bs = As + NP * BQ * LD;           // [BN][LD]: the doc tile, i.e. B = docs^T in column-major order
    const T* qp = static_cast<const T*>(a.qparts);
    const T* docs = static_cast<const T*>(a.docs);
    const int warp = threadIdx.x / 32, wm = warp / 4, wn = warp % 4;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
    for (int64_t k0 = 0; k0 < a.dim; k0 += BK) {
      if constexpr (VEC) {  // 8 elements (16 bytes) per load; dim % 8 == 0 so a piece is all in or all out
        for (int e = threadIdx.x; e < NP * BQ * (BK / 8); e += NT) {
          const int p = e / (BQ * (BK / 8)), r = (e / (BK / 8)) % BQ, c = (e % (BK / 8)) * 8;
          const int64_t qrow = q0 + r, kk = k0 + c;
          uint4 v = make_uint4(0, 0, 0, 0);
          if (qrow < a.nq && kk < a.dim) v = *reinterpret_cast<const uint4*>(qp + (p * a.nq + qrow) * a.dim + kk);
          *reinterpret_cast<uint4*>(As + (p * BQ + r) * LD + c) = v;
        }
        for (int e = threadIdx.x; e < BN * (BK / 8); e += NT) {
          const int r = e / (BK / 8), c = (e % (BK / 8)) * 8;
          const int64_t drow = t0 + r, kk = k0 + c;
          uint4 v = make_uint4(0, 0, 0, 0);
          if (drow < hi && kk < a.dim) v = __ldcs(reinterpret_cast<const uint4*>(docs + drow * a.dim + kk));
          *reinterpret_cast<uint4*>(Bs + r * LD + c) = v;
        }
      } else {
        for (int e = threadIdx.x; e < NP * BQ * BK; e += NT) {
          const int p = e / (BQ * BK), r = (e / BK) % BQ, c = e % BK;
          const int64_t qrow = q0 + r, kk = k0 + c;
          As[(p * BQ + r) * LD + c] = (qrow < a.nq && kk < a.dim) ? qp[(p * a.nq + qrow) * a.dim + kk] : zero_of<T>();
        }
        for (int e = threadIdx.x; e < BN * BK; e += NT) {
          const int r = e / BK, c = e % BK;
          const int64_t drow = t0 + r, kk = k0 + c;
          Bs[r * LD + c] = (drow < hi && kk < a.dim) ? docs[drow * a.dim + kk] : zero_of<T>();
        }
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < BK; kk += 16) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b[2];
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], Bs + (wn * 32 + j * 16) * LD + kk, LD);
#pragma unroll
        for (int p = 0; p < NP; ++p) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> af[2];
#pragma unroll
          for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(af[i], As + (p * BQ + wm * 32 + i * 16) * LD + kk, LD);
#pragma unroll
          for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], af[i], b[j], acc[i][j]);
        }
      }
      __syncthreads();
    }
    float* S = reinterpret_cast<float*>(smem);
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(S + (wm * 32 + i * 16) * BN + wn * 32 + j * 16, acc[i][j], BN, wmma::mem_row_major);
  }
};

// Block (query tile blockIdx.x, doc chunk blockIdx.y): score the chunk tile by tile with producer P, append keys
// above each query's threshold to its list in global memory, and cut a list back to its best k whenever the next
// tile could overflow it (cap = 2k + BN). With a.last it ends with at most k keys per list and their count in
// counts; otherwise (a chunk of the chunked-GEMM path) it saves counts and thresholds for the next launch.
// P::tile receives the block's current thresholds, so a producer may skip docs that cannot pass them (SketchGemv).
template <class P>
__global__ void __launch_bounds__(NT) search_kernel(Args a) {
  constexpr int BQ = P::BQ, BN = P::BN;
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ u64 thr[BQ];
  __shared__ int cnt[BQ];
  __shared__ float qmul[BQ];
  __shared__ SelectSmem sel;
  const int64_t q0 = int64_t(blockIdx.x) * BQ;
  const int64_t c = blockIdx.y;
  const int64_t lo = c * a.chunk_len, hi = min(a.nb, lo + a.chunk_len);
  const int64_t slot = a.cap + a.k;
  u64* lists = a.keys + c * slot;  // list of query q: lists + q * chunks * slot
  const int64_t qstride = a.chunks * slot;
  for (int i = threadIdx.x; i < BQ; i += NT) {
    const bool resume = !a.first && q0 + i < a.nq;
    thr[i] = resume ? a.thr_g[(q0 + i) * a.chunks + c] : 0;
    cnt[i] = resume ? a.counts[(q0 + i) * a.chunks + c] : 0;
    qmul[i] = (a.qmul != nullptr && q0 + i < a.nq) ? a.qmul[q0 + i] : 1.0f;
  }
  P::init(a, smem, q0);
  __syncthreads();
  const float* S = reinterpret_cast<const float*>(smem);
  for (int64_t t0 = lo; t0 < hi; t0 += BN) {
    P::tile(a, smem, q0, t0, hi, thr);
    __syncthreads();
    for (int e = threadIdx.x; e < BQ * BN; e += NT) {
      const int qi = e / BN, j = e % BN;
      const int64_t doc = t0 + j;
      if (q0 + qi >= a.nq || doc >= hi) continue;
      float s = S[qi * BN + j] * qmul[qi];
      if (a.scale != nullptr) s *= a.scale[doc];
      const u64 key = make_key(s, a.doc0 + doc);
      if (key > thr[qi]) lists[(q0 + qi) * qstride + atomicAdd(&cnt[qi], 1)] = key;
    }
    __syncthreads();
    for (int qi = 0; qi < BQ; ++qi) {
      const int n = cnt[qi];  // read by every thread before block_compact's first barrier: uniform branch
      if (n > a.cap - BN) {
        const u64 kth = block_compact(lists + (q0 + qi) * qstride, n, a.k, a.cap, sel);
        if (threadIdx.x == 0) {
          thr[qi] = kth;
          cnt[qi] = static_cast<int>(a.k);
        }
        __syncthreads();
      }
    }
  }
  for (int qi = 0; qi < BQ && a.last; ++qi) {
    const int n = cnt[qi];
    if (n > a.k) {
      block_compact(lists + (q0 + qi) * qstride, n, a.k, a.cap, sel);
      if (threadIdx.x == 0) cnt[qi] = static_cast<int>(a.k);
      __syncthreads();
    }
  }
  __syncthreads();
  for (int qi = threadIdx.x; qi < BQ; qi += NT) {
    if (q0 + qi >= a.nq) continue;
    a.counts[(q0 + qi) * a.chunks + c] = cnt[qi];
    if (!a.last) a.thr_g[(q0 + qi) * a.chunks + c] = thr[qi];
  }
}

// ---- warp-per-list selection of precomputed scores (chunked-GEMM path, select variant 1) -----------------------
// The block kernel above (search_kernel<Scores>) reads the scores at ~0.5 TB/s on an H100 at 1024 queries
// (benchmarks/results/profile_cuda_search.json); by a count of its source, not a profile, it spends some 60
// instructions per score (index arithmetic, shared-memory staging, two barriers per tile) at 4 blocks per SM.
// Here one warp owns one (query, column segment) list: it streams its segment of the score row with 16-byte loads,
// two in flight per lane (64 registers on sm_90: 4 blocks = 32 warps per SM; four loads took 80), and tests each
// score against the list's threshold in the float domain -- one compare per score; the key, the ballot and the
// append only for the rare scores that pass. No block barriers: a list that could overflow is cut back to its best
// k by its warp alone (radix select over the list, which sits in L2, with a warp-private histogram in shared
// memory). Same lists, counts and thresholds as the block kernel, so the merge is shared.
constexpr unsigned kFull = 0xffffffffu;
constexpr int kWarps = NT / 32;
constexpr int kSelLoads = 2;               // float4 loads in flight per lane
constexpr int kSelStep = 128 * kSelLoads;  // columns a warp reads per step

// Bin b of a warp's histogram lives at word b + b / 8: the scan below reads bins 8 apart across lanes, which would
// otherwise fall into 4 banks (8-way conflicts); the padding spreads them over all 32.
constexpr int kHistWords = 256 + 32;
__device__ __forceinline__ unsigned hslot(unsigned b) { return b + (b >> 3); }

// The k-th largest key of buf[0, n) (keys unique, n >= k), by one warp; hist: its kHistWords shared counters.
__device__ u64 warp_kth_largest(const u64* buf, int64_t n, int64_t k, unsigned* hist) {
  const int lane = threadIdx.x & 31;
  u64 prefix = 0, mask = 0;
  unsigned krem = static_cast<unsigned>(k);
  for (int shift = 56; shift >= 0; shift -= 8) {
    for (int i = lane; i < kHistWords; i += 32) hist[i] = 0;
    __syncwarp();
    for (int64_t i0 = 0; i0 < n; i0 += 32) {
      const int64_t i = i0 + lane;
      const u64 x = i < n ? buf[i] : 0;
      const bool in = i < n && (x & mask) == prefix;
      const unsigned bin = static_cast<unsigned>(x >> shift) & 255u;
      // Keys of one list share their top bits, so most land in one bin: one atomic per distinct bin.
      const unsigned same = __match_any_sync(kFull, in ? bin : 256u + bin);
      if (in && lane == __ffs(same) - 1) atomicAdd(&hist[hslot(bin)], static_cast<unsigned>(__popc(same)));
    }
    __syncwarp();
    // Lane L holds bins 255 - 8L down to 248 - 8L; an inclusive scan over lanes finds the bin of the krem-th key.
    unsigned own[8], sum = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      own[j] = hist[hslot(255 - 8 * lane - j)];
      sum += own[j];
    }
    unsigned incl = sum;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const unsigned v = __shfl_up_sync(kFull, incl, d);
      if (lane >= d) incl += v;
    }
    const unsigned excl = incl - sum;
    const int src = __ffs(__ballot_sync(kFull, excl < krem && incl >= krem)) - 1;
    unsigned bin = 0, above = excl;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      if (bin == 0 && above + own[j] >= krem) bin = 256u + (255u - 8u * lane - j);  // 256+: found (bin may be 0)
      if (bin == 0) above += own[j];
    }
    bin = __shfl_sync(kFull, bin, src) - 256u;
    above = __shfl_sync(kFull, above, src);
    prefix |= u64(bin) << shift;
    mask |= u64(255) << shift;
    krem -= above;
    __syncwarp();  // every lane has read hist before the next pass clears it
  }
  return prefix;  // all 64 bits fixed: the k-th key itself
}

// Keeps the k best of buf[0, n) (n > k) in buf[0, k), staging through buf[cap, cap + k); returns the k-th key.
__device__ u64 warp_compact(u64* buf, int64_t n, int64_t k, int64_t cap, unsigned* hist) {
  const int lane = threadIdx.x & 31;
  const u64 kth = warp_kth_largest(buf, n, k, hist);
  int64_t kept = 0;
  for (int64_t i0 = 0; i0 < n; i0 += 32) {
    const int64_t i = i0 + lane;
    const u64 x = i < n ? buf[i] : 0;
    const bool keep = i < n && x >= kth;
    const unsigned b = __ballot_sync(kFull, keep);
    if (keep) buf[cap + kept + __popc(b & ((1u << lane) - 1u))] = x;
    kept += __popc(b);
  }
  __syncwarp();  // orders the staging writes before other lanes read them
  for (int64_t i = lane; i < k; i += 32) buf[i] = buf[cap + i];
  __syncwarp();
  return kth;
}

// Appends the keys of this lane's 4 scores v[0..3] (columns j..j+3 of a step of rem columns, doc ids id0 + column)
// that beat the threshold; first cuts the list to its best k if 128 more keys might not fit. (Inlined: as a call,
// the ABI's saved registers raised the kernel from 64 to 80 registers, i.e. fewer warps per SM.)
__device__ __forceinline__ void admit(u64* list, const float* v, int j, int rem, int64_t id0, int64_t k, int64_t cap,
                                   u64& thr, float& thr_s, int64_t& cnt, unsigned* hist) {
  const int lane = threadIdx.x & 31;
  if (cnt + 128 > cap) {  // cap = 2k + 128, so cnt > 2k >= k: a cut is possible
    thr = warp_compact(list, cnt, k, cap, hist);
    cnt = k;
    thr_s = key_score(thr);
  }
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const bool in = j + e < rem;
    const u64 key = in ? make_key(v[e], id0 + j + e) : 0;
    const bool pass = in && key > thr;
    const unsigned b = __ballot_sync(kFull, pass);
    if (pass) list[cnt + __popc(b & ((1u << lane) - 1u))] = key;
    cnt += __popc(b);
  }
}

// Warp w of the grid owns list (q, c) = (w / chunks, w % chunks): docs [c * chunk_len, ...) of this score chunk.
__global__ void __launch_bounds__(NT) select_warp_kernel(Args a) {
  __shared__ unsigned hist[kWarps][kHistWords];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t w = int64_t(blockIdx.x) * kWarps + warp;
  if (w >= a.nq * a.chunks) return;  // a whole warp: nothing below synchronises more than one warp
  const int64_t q = w / a.chunks, c = w % a.chunks, slot = a.cap + a.k;
  u64* list = a.keys + w * slot;  // == keys + (q * chunks + c) * slot, the block kernel's layout
  u64 thr = a.first ? 0 : a.thr_g[w];
  int64_t cnt = a.first ? 0 : a.counts[w];
  // thr 0 admits everything (even NaN scores, as -inf keys); otherwise a score below key_score(thr) cannot pass.
  float thr_s = thr == 0 ? -INFINITY : key_score(thr);
  const float mul = a.qmul != nullptr ? a.qmul[q] : 1.0f;
  const int64_t lo = c * a.chunk_len, hi = min(a.nb, lo + a.chunk_len);
  const float* row = a.scores + q * a.ld_scores;
  const bool vec = a.ld_scores % 4 == 0 && reinterpret_cast<uintptr_t>(a.scores) % 16 == 0;  // lo % 4 == 0 too
  for (int64_t g0 = lo; g0 < hi; g0 += kSelStep) {
    const float* base = row + g0;
    const int rem = static_cast<int>(min(hi - g0, int64_t{kSelStep}));  // columns of this step
    float v[4 * kSelLoads];
#pragma unroll
    for (int u = 0; u < kSelLoads; ++u) {
      const int j = u * 128 + lane * 4;
      if (vec && j + 3 < rem) {
        const float4 f = __ldcs(reinterpret_cast<const float4*>(base + j));
        v[4 * u] = f.x, v[4 * u + 1] = f.y, v[4 * u + 2] = f.z, v[4 * u + 3] = f.w;
      } else {
#pragma unroll
        for (int e = 0; e < 4; ++e) v[4 * u + e] = j + e < rem ? __ldcs(base + j + e) : 0.0f;
      }
    }
#pragma unroll
    for (int u = 0; u < kSelLoads; ++u) {
      const int j = u * 128 + lane * 4;
      bool any = false;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        v[4 * u + e] *= mul;
        any |= j + e < rem && !(v[4 * u + e] < thr_s);
      }
      if (!__any_sync(kFull, any)) continue;  // the common case once the threshold has risen
      admit(list, v + 4 * u, j, rem, a.doc0 + g0, a.k, a.cap, thr, thr_s, cnt, hist[warp]);
    }
  }
  if (a.last && cnt > a.k) {
    warp_compact(list, cnt, a.k, a.cap, hist[warp]);
    cnt = a.k;
  }
  if (lane == 0) {
    a.counts[w] = static_cast<int>(cnt);
    if (!a.last) a.thr_g[w] = thr;
  }
}

// Merge of the chunks' candidate lists, in levels. At a level the live lists sit at chunks 0, s, 2s, ... (s = the
// stride); block (query, g) merges G consecutive live lists in shared memory (one global read of each key, then
// radix select on-chip) and writes the best k back in place, at chunk g*G*s, so the next level's stride is G*s.
// The last level (one block per query) sorts the k best descending (bitonic) and writes scores and ids.
__global__ void __launch_bounds__(NT) merge_level_kernel(u64* keys, int* counts, int64_t chunks, int64_t slot,
                                                         int64_t k, int64_t stride, int64_t G, bool last, int kpad,
                                                         float* scores, int64_t* ids) {
  extern __shared__ __align__(16) u64 sk[];  // [G * k] gathered keys (0 = hole), then [kpad] for the final sort
  __shared__ SelectSmem sel;
  const int64_t q = blockIdx.x, g = blockIdx.y;
  u64* base = keys + q * chunks * slot;
  int* cnt = counts + q * chunks;
  const int64_t n = G * k;
  int64_t real = 0;  // keys present (per thread, summed below)
  for (int64_t e = threadIdx.x; e < n; e += NT) {
    const int64_t c = (g * G + e / k) * stride, i = e % k;
    u64 x = 0;
    if (c < chunks && i < cnt[c]) {
      x = base[c * slot + i];
      ++real;
    }
    sk[e] = x;
  }
  if (threadIdx.x == 0) sel.count = 0;
  __syncthreads();
  atomicAdd(&sel.count, static_cast<int>(real));
  __syncthreads();
  const int64_t total = sel.count;
  __syncthreads();
  // Every key kept when there are at most k of them (a short chunk); otherwise exactly the k best (keys are unique).
  const u64 kth = total <= k ? u64(1)
                             : block_kth_largest(
                                   [](int64_t i, u64& x) {
                                     x = sk[i];
                                     return x != 0;
                                   },
                                   n, k, sel);
  u64* out = sk + n;  // [max(k, kpad)]
  if (threadIdx.x == 0) sel.count = 0;
  __syncthreads();
  for (int64_t e = threadIdx.x; e < n; e += NT) {
    const u64 x = sk[e];
    if (x >= kth) out[atomicAdd(&sel.count, 1)] = x;
  }
  __syncthreads();
  const int kept = sel.count;
  if (!last) {
    const int64_t c = g * G * stride;
    for (int i = threadIdx.x; i < kept; i += NT) base[c * slot + i] = out[i];
    if (threadIdx.x == 0) cnt[c] = kept;
    return;
  }
  for (int i = kept + threadIdx.x; i < kpad; i += NT) out[i] = 0;  // padding sorts last
  for (int size = 2; size <= kpad; size <<= 1) {
    for (int st = size >> 1; st > 0; st >>= 1) {
      __syncthreads();
      for (int i = threadIdx.x; i < kpad; i += NT) {
        const int j = i ^ st;
        if (j > i) {
          const u64 x = out[i], y = out[j];
          const bool desc = (i & size) == 0;
          if (desc ? (x < y) : (x > y)) {
            out[i] = y;
            out[j] = x;
          }
        }
      }
    }
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < k; i += NT) {
    scores[q * k + i] = key_score(out[i]);
    ids[q * k + i] = key_id(out[i]);
  }
}

// Splits fp32 queries into NP parts of T for the tensor-core path; fp16 rescales each query by a power of two
// first (exact) so its largest entry sits near 2^14, inside fp16's range, and records the inverse in qmul.
template <class T, int NP>
__global__ void __launch_bounds__(NT) split_queries_kernel(const float* q, int64_t nq, int64_t dim, T* parts,
                                                           float* qmul) {
  __shared__ float red[NT / 32];
  const int64_t row = blockIdx.x;
  const float* x = q + row * dim;
  float m = 0.0f;
  for (int64_t p = threadIdx.x; p < dim; p += NT) m = fmaxf(m, fabsf(x[p]));
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = m;
  __syncthreads();
  m = 0.0f;
  for (int i = 0; i < NT / 32; ++i) m = fmaxf(m, red[i]);
  int e = 0;
  if (std::is_same<T, __half>::value && NP > 1 && m > 0.0f && m <= 3.0e38f) {  // NP = 1: the query is already T
    int ex;
    frexpf(m, &ex);  // m < 2^ex
    e = max(-120, min(120, 14 - ex));
  }
  for (int64_t p = threadIdx.x; p < dim; p += NT) {
    float v = ldexpf(x[p], e);
#pragma unroll
    for (int i = 0; i < NP; ++i) {
      T h;
      if constexpr (std::is_same<T, __half>::value) h = __float2half_rn(v);
      else h = __float2bfloat16_rn(v);
      parts[(i * nq + row) * dim + p] = h;
      v -= to_f(h);
    }
  }
  if (threadIdx.x == 0) qmul[row] = ldexpf(1.0f, -e);
}

// ---- planning and launch ---------------------------------------------------------------------------------------
enum class Mode { gemv, simt, wmma };

template <class T> struct DevType;
template <> struct DevType<float> { using type = float; };
template <> struct DevType<half_t> { using type = __half; };
template <> struct DevType<bf16_t> { using type = __nv_bfloat16; };
template <> struct DevType<int8_t> { using type = int8_t; };

struct Plan {
  Mode mode;
  int bq, bn, np;
  int64_t qtiles, chunks, chunk_len, cap;
  size_t keys_off, counts_off, qparts_off, qmul_off, total;
};

constexpr size_t kBudget = size_t(192) << 20;  // candidate-list memory aimed for (the H100 target is <= 256 MiB)

size_t align_up(size_t x) { return (x + 255) & ~size_t(255); }

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(std::string("topk_ip CUDA ") + what + ": " + cudaGetErrorString(err));
  }
}

// Blocks per SM the fused kernel aims for (4; PYRAG_TOPK_CUDA_BLOCKS_PER_SM overrides it, for tuning runs).
int64_t blocks_per_sm() {
  const char* env = std::getenv("PYRAG_TOPK_CUDA_BLOCKS_PER_SM");
  const long v = env != nullptr ? std::strtol(env, nullptr, 10) : 0;
  return v > 0 && v <= 64 ? v : 4;
}

int64_t sm_count() {
  int dev = 0, sms = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
  return std::max(sms, 1);
}

// How both paths cut n doc columns among blocks: about `blocks` blocks over `qtiles` query tiles, each chunk at least
// one bn-column tile, the candidate lists (list_bytes per chunk) within budget, at most 65535 chunks (a grid
// dimension). Sets len (a multiple of bn) and count = ceil(n / len).
void split_columns(int64_t n, int64_t blocks, int64_t qtiles, int64_t bn, int64_t list_bytes, int64_t budget,
                   int64_t& len, int64_t& count) {
  int64_t c = std::max<int64_t>(1, (blocks + qtiles - 1) / qtiles);
  c = std::min(c, (n + bn - 1) / bn);
  if (c * list_bytes > budget) c = std::max<int64_t>(1, budget / list_bytes);
  c = std::min<int64_t>(c, 65535);
  const int64_t per = (n + c - 1) / c;
  len = (per + bn - 1) / bn * bn;
  count = (n + len - 1) / len;
}

Plan make_plan(int64_t nq, int64_t nb, int64_t dim, int64_t k, int dtype, bool exact_queries) {
  Plan p{};
  const bool half_docs = dtype == int(DType::f16) || dtype == int(DType::bf16);
  if (nq <= 8) {
    p.mode = Mode::gemv;
    p.bq = 1;
    while (p.bq < nq) p.bq *= 2;
    while (p.bq > 1 && int64_t(p.bq) * dim * 4 > (32 << 10)) p.bq /= 2;  // queries live in shared memory
    p.bn = p.bq <= 2 ? 128 : 64;  // Gemv<.., BQ, ..>::BN
  } else if (half_docs) {
    p.mode = Mode::wmma;
    p.bq = 64;
    p.bn = 128;
    p.np = exact_queries ? 1 : dtype == int(DType::f16) ? 2 : 3;  // fp16/bf16 queries need no split
  } else {
    p.mode = Mode::simt;
    p.bq = 64;
    p.bn = 64;
  }
  p.qtiles = (nq + p.bq - 1) / p.bq;
  p.cap = 2 * k + p.bn;
  const int64_t slot = p.cap + k;
  // Enough blocks to fill the GPU a few times over, each chunk at least a tile, the lists within budget.
  split_columns(nb, blocks_per_sm() * sm_count(), p.qtiles, p.bn, std::max<int64_t>(nq, 1) * slot * 8,
                int64_t(kBudget), p.chunk_len, p.chunks);
  size_t off = 0;
  p.keys_off = off;
  off = align_up(off + size_t(nq) * size_t(p.chunks) * size_t(slot) * 8);
  p.counts_off = off;
  off = align_up(off + size_t(nq) * size_t(p.chunks) * 4);
  p.qparts_off = off;
  if (p.mode == Mode::wmma) off = align_up(off + size_t(p.np) * size_t(nq) * size_t(dim) * 2);
  p.qmul_off = off;
  if (p.mode == Mode::wmma) off = align_up(off + size_t(nq) * 4);
  p.total = off;
  return p;
}

template <class P>
void launch_search(const Args& a, const Plan& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.qtiles), static_cast<unsigned>(p.chunks));
  search_kernel<P><<<grid, NT, P::smem_bytes(a.dim), stream>>>(a);
  check_cuda(cudaGetLastError(), "search kernel launch");
}

template <class D, int BQ>
void launch_gemv(const Args& a, const Plan& p, bool vec, cudaStream_t stream) {
  if (vec) launch_search<Gemv<D, BQ, true>>(a, p, stream);
  else launch_search<Gemv<D, BQ, false>>(a, p, stream);
}

template <class D, int BQ>
void launch_sketch(const Args& a, const Plan& p, bool vec, cudaStream_t stream) {
  if (vec) launch_search<SketchGemv<D, BQ, true>>(a, p, stream);
  else launch_search<SketchGemv<D, BQ, false>>(a, p, stream);
}

// Shared memory of one merge block (G lists of k keys + the sort buffer) is kept under this; above 48 KiB it needs
// an opt-in, which every sm_80+ GPU grants up to at least 99 KiB (sm_86/89; 163 KiB on sm_80, 227 KiB on sm_90).
constexpr size_t kMergeSmem = size_t(96) << 10;

void merge_lists(u64* keys, int* counts, int64_t nq, int64_t chunks, int64_t slot, int64_t k, float* scores,
                 int64_t* ids, cudaStream_t stream) {
  int kpad = 1;
  while (kpad < k) kpad *= 2;
  const int64_t room = int64_t(kMergeSmem / 8) - std::max<int64_t>(k, kpad);  // keys the gather may take
  const int64_t G = std::max<int64_t>(2, room / k);                           // >= 2: k <= kCudaMaxK = 4096
  check_cuda(cudaFuncSetAttribute(merge_level_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(kMergeSmem)),
             "cudaFuncSetAttribute");
  int64_t lists = chunks, stride = 1;
  while (true) {
    const int64_t g = std::min<int64_t>(G, lists);  // the last level merges all that is left
    const int64_t groups = (lists + g - 1) / g;
    const bool last = groups == 1;
    const size_t smem = size_t(g * k + std::max<int64_t>(k, kpad)) * 8;
    merge_level_kernel<<<dim3(static_cast<unsigned>(nq), static_cast<unsigned>(groups)), NT, smem, stream>>>(
        keys, counts, chunks, slot, k, stride, g, last, kpad, scores, ids);
    check_cuda(cudaGetLastError(), "merge kernel launch");
    if (last) return;
    lists = groups;
    stride *= g;
  }
}

// What both paths fill alike: the sizes and the candidate lists (keys, counts) in the workspace.
Args list_args(int64_t nq, int64_t nb, int64_t k, int64_t cap, int64_t chunks, int64_t chunk_len, unsigned char* keys,
               unsigned char* counts) {
  Args a{};
  a.nq = nq;
  a.nb = nb;
  a.k = k;
  a.cap = cap;
  a.chunks = chunks;
  a.chunk_len = chunk_len;
  a.keys = reinterpret_cast<u64*>(keys);
  a.counts = reinterpret_cast<int*>(counts);
  return a;
}

// Chunked-GEMM path: lists of every (query, column) pair, with their counts and thresholds kept between the calls.
struct SelectPlan {
  int64_t qtiles, cols, col_len, cap;
  size_t keys_off, counts_off, thr_off, total;
};

// variant 0: search_kernel<Scores> (blocks of 16 queries x a column range); 1: select_warp_kernel (a warp per query
// and column range, aiming at one wave: 32 resident warps per SM at its 64 registers; a range is a whole number of
// its kSelStep-column steps).
SelectPlan make_select_plan(int64_t nq, int64_t k, int64_t chunk, int variant) {
  if (variant != 0 && variant != 1)
    throw std::invalid_argument("topk_select CUDA: variant=" + std::to_string(variant) + " (0 block, 1 warp)");
  SelectPlan p{};
  p.qtiles = variant == 0 ? (nq + Scores::BQ - 1) / Scores::BQ : nq;
  p.cap = 2 * k + Scores::BN;  // both kernels append at most 128 keys between cuts
  const int64_t slot = p.cap + k;
  // a third of the budget: the caller also holds a score chunk (pyrag/ops/topk_ip.py keeps it under 64 MiB)
  split_columns(chunk, (variant == 0 ? 4 : 32) * sm_count(), p.qtiles, variant == 0 ? Scores::BN : kSelStep,
                nq * slot * 8, int64_t(kBudget / 3), p.col_len, p.cols);
  size_t off = 0;
  p.keys_off = off;
  off = align_up(off + size_t(nq) * size_t(p.cols) * size_t(slot) * 8);
  p.counts_off = off;
  off = align_up(off + size_t(nq) * size_t(p.cols) * 4);
  p.thr_off = off;
  off = align_up(off + size_t(nq) * size_t(p.cols) * 8);
  p.total = off;
  return p;
}

// The fused paths' common start: the sizes checked (nq up to max_nq), the plan, the workspace checked, and Args
// with the lists, queries and docs filled in. False when there are no queries (nothing to do).
template <class T>
bool fused_setup(const char* who, const float* queries, const T* docs, int64_t nq, int64_t max_nq, int64_t nb,
                 int64_t dim, int64_t k, bool exact_queries, void* workspace, size_t workspace_bytes, Plan& p,
                 Args& a) {
  if (nq < 0 || nq > max_nq || nb < 1 || nb > kCudaMaxN || dim < 1 || dim > kCudaMaxDim || k < 1 || k > nb ||
      k > kCudaMaxK)
    throw std::invalid_argument(std::string(who) + ": unsupported sizes nq=" + std::to_string(nq) + " nb=" +
                                std::to_string(nb) + " dim=" + std::to_string(dim) + " k=" + std::to_string(k));
  if (nq == 0) return false;
  constexpr int dtype = std::is_same<T, float>::value    ? int(DType::f32)
                        : std::is_same<T, half_t>::value ? int(DType::f16)
                        : std::is_same<T, bf16_t>::value ? int(DType::bf16)
                                                         : int(DType::i8);
  p = make_plan(nq, nb, dim, k, dtype, exact_queries);
  if (workspace_bytes < p.total)
    throw std::invalid_argument(std::string(who) + ": workspace of " + std::to_string(workspace_bytes) +
                                " bytes, need " + std::to_string(p.total));
  auto* ws = static_cast<unsigned char*>(workspace);
  a = list_args(nq, nb, k, p.cap, p.chunks, p.chunk_len, ws + p.keys_off, ws + p.counts_off);
  a.q = queries;
  a.docs = docs;
  a.dim = dim;
  return true;
}

}  // namespace

size_t cuda_select_workspace_bytes(int64_t nq, int64_t k, int64_t chunk, int variant) {
  if (chunk < 1 || k < 1)
    throw std::invalid_argument("topk_select CUDA: chunk=" + std::to_string(chunk) + " k=" + std::to_string(k) +
                                " must be >= 1");
  if (nq <= 0) return 0;
  return make_select_plan(nq, k, chunk, variant).total;
}

void topk_select_cuda(const float* scores_chunk, int64_t ld, const float* qmul, int64_t nq, int64_t doc0, int64_t n,
                      int64_t k, int64_t chunk, bool first, bool last, void* workspace, size_t workspace_bytes,
                      cudaStream_t stream, int variant) {
  if (nq < 0 || k < 1 || k > kCudaMaxK || chunk < 1 || n < 0 || n > chunk || ld < n || doc0 < 0 ||
      doc0 + n > kCudaMaxN)
    throw std::invalid_argument("topk_select CUDA: unsupported sizes nq=" + std::to_string(nq) + " k=" +
                                std::to_string(k) + " chunk=" + std::to_string(chunk) + " n=" + std::to_string(n) +
                                " ld=" + std::to_string(ld) + " doc0=" + std::to_string(doc0));
  if (nq == 0) return;
  const SelectPlan p = make_select_plan(nq, k, chunk, variant);
  if (workspace_bytes < p.total)
    throw std::invalid_argument("topk_select CUDA: workspace of " + std::to_string(workspace_bytes) +
                                " bytes, need " + std::to_string(p.total));
  auto* ws = static_cast<unsigned char*>(workspace);
  Args a = list_args(nq, n, k, p.cap, p.cols, p.col_len, ws + p.keys_off, ws + p.counts_off);
  a.qmul = qmul;
  a.thr_g = reinterpret_cast<u64*>(ws + p.thr_off);
  a.scores = scores_chunk;
  a.ld_scores = ld;
  a.doc0 = doc0;
  a.first = first;
  a.last = last;
  if (variant == 1) {
    const int64_t warps = nq * p.cols;
    select_warp_kernel<<<static_cast<unsigned>((warps + kWarps - 1) / kWarps), NT, 0, stream>>>(a);
  } else {
    const dim3 grid(static_cast<unsigned>(p.qtiles), static_cast<unsigned>(p.cols));
    search_kernel<Scores><<<grid, NT, Scores::smem_bytes(0), stream>>>(a);
  }
  check_cuda(cudaGetLastError(), "select kernel launch");
}

void topk_select_finish_cuda(int64_t nq, int64_t k, int64_t chunk, float* scores, int64_t* ids, void* workspace,
                             size_t workspace_bytes, cudaStream_t stream, int variant) {
  if (chunk < 1 || k < 1 || k > kCudaMaxK)
    throw std::invalid_argument("topk_select CUDA: chunk=" + std::to_string(chunk) + " k=" + std::to_string(k));
  if (nq <= 0) return;
  const SelectPlan p = make_select_plan(nq, k, chunk, variant);
  if (workspace_bytes < p.total)
    throw std::invalid_argument("topk_select CUDA: workspace too small");
  auto* ws = static_cast<unsigned char*>(workspace);
  merge_lists(reinterpret_cast<u64*>(ws + p.keys_off), reinterpret_cast<int*>(ws + p.counts_off), nq, p.cols,
              p.cap + k, k, scores, ids, stream);
}

size_t cuda_workspace_bytes(int64_t nq, int64_t nb, int64_t dim, int64_t k, int dtype_code, bool exact_queries) {
  if (nq <= 0) return 0;
  return make_plan(nq, nb, dim, k, dtype_code, exact_queries).total;
}

template <class T>
void topk_ip_cuda(const float* queries, const T* docs, const float* scale, int64_t nq, int64_t nb, int64_t dim,
                  int64_t k, bool exact_queries, float* scores, int64_t* ids, void* workspace,
                  size_t workspace_bytes, cudaStream_t stream) {
  using D = typename DevType<T>::type;
  Plan p;
  Args a;
  if (!fused_setup("topk_ip CUDA", queries, docs, nq, INT64_MAX, nb, dim, k, exact_queries, workspace, workspace_bytes,
                   p, a))
    return;
  a.scale = scale;
  auto* ws = static_cast<unsigned char*>(workspace);
  // 16-byte loads need 16-byte aligned rows.
  const bool vec = reinterpret_cast<uintptr_t>(docs) % 16 == 0 && (dim * int64_t(sizeof(T))) % 16 == 0;
  if (p.mode == Mode::gemv) {
    switch (p.bq) {
      case 1: launch_gemv<D, 1>(a, p, vec, stream); break;
      case 2: launch_gemv<D, 2>(a, p, vec, stream); break;
      case 4: launch_gemv<D, 4>(a, p, vec, stream); break;
      default: launch_gemv<D, 8>(a, p, vec, stream); break;
    }
  } else if (p.mode == Mode::simt) {
    launch_search<Simt<D>>(a, p, stream);
  } else {
    if constexpr (std::is_same<D, __half>::value || std::is_same<D, __nv_bfloat16>::value) {
      constexpr int NP = std::is_same<D, __half>::value ? 2 : 3;
      D* parts = reinterpret_cast<D*>(ws + p.qparts_off);
      float* qmul = reinterpret_cast<float*>(ws + p.qmul_off);
      a.qparts = parts;
      a.qmul = qmul;
      // parts rows are dim * 2 bytes like the docs' and the workspace is 256-byte aligned: vec holds for both
      if (p.np == 1) {
        split_queries_kernel<D, 1><<<static_cast<unsigned>(nq), NT, 0, stream>>>(queries, nq, dim, parts, qmul);
        check_cuda(cudaGetLastError(), "split_queries launch");
        if (vec) launch_search<Wmma<D, 1, true>>(a, p, stream);
        else launch_search<Wmma<D, 1, false>>(a, p, stream);
      } else {
        split_queries_kernel<D, NP><<<static_cast<unsigned>(nq), NT, 0, stream>>>(queries, nq, dim, parts, qmul);
        check_cuda(cudaGetLastError(), "split_queries launch");
        if (vec) launch_search<Wmma<D, NP, true>>(a, p, stream);
        else launch_search<Wmma<D, NP, false>>(a, p, stream);
      }
    }
  }
  merge_lists(a.keys, a.counts, nq, p.chunks, p.cap + k, k, scores, ids, stream);
}

template <class T>
void topk_ip_sketch_cuda(const float* queries, const T* docs, const int8_t* codes, const float* sk_scale,
                         const float* sk_norm, const float* sk_res, const float* coef, int64_t nq, int64_t nb,
                         int64_t dim, int64_t k, float* scores, int64_t* ids, void* workspace, size_t workspace_bytes,
                         cudaStream_t stream) {
  using D = typename DevType<T>::type;
  Plan p;  // nq <= 8: the gemv plan, whose tiles SketchGemv shares
  Args a;
  if (!fused_setup("topk_ip sketch CUDA", queries, docs, nq, kCudaSketchMaxQ, nb, dim, k, false, workspace,
                   workspace_bytes, p, a))
    return;
  a.codes = codes;
  a.sk_scale = sk_scale;
  a.sk_norm = sk_norm;
  a.sk_res = sk_res;
  a.coef = coef;
  const bool vec = reinterpret_cast<uintptr_t>(docs) % 16 == 0 && (dim * int64_t(sizeof(T))) % 16 == 0;
  switch (p.bq) {
    case 1: launch_sketch<D, 1>(a, p, vec, stream); break;
    case 2: launch_sketch<D, 2>(a, p, vec, stream); break;
    case 4: launch_sketch<D, 4>(a, p, vec, stream); break;
    default: launch_sketch<D, 8>(a, p, vec, stream); break;
  }
  merge_lists(a.keys, a.counts, nq, p.chunks, p.cap + k, k, scores, ids, stream);
}

template void topk_ip_sketch_cuda<float>(const float*, const float*, const int8_t*, const float*, const float*,
                                         const float*, const float*, int64_t, int64_t, int64_t, int64_t, float*,
                                         int64_t*, void*, size_t, cudaStream_t);
template void topk_ip_sketch_cuda<half_t>(const float*, const half_t*, const int8_t*, const float*, const float*,
                                          const float*, const float*, int64_t, int64_t, int64_t, int64_t, float*,
                                          int64_t*, void*, size_t, cudaStream_t);
template void topk_ip_sketch_cuda<bf16_t>(const float*, const bf16_t*, const int8_t*, const float*, const float*,
                                          const float*, const float*, int64_t, int64_t, int64_t, int64_t, float*,
                                          int64_t*, void*, size_t, cudaStream_t);

template void topk_ip_cuda<float>(const float*, const float*, const float*, int64_t, int64_t, int64_t, int64_t,
                                  bool, float*, int64_t*, void*, size_t, cudaStream_t);
template void topk_ip_cuda<half_t>(const float*, const half_t*, const float*, int64_t, int64_t, int64_t, int64_t,
                                   bool, float*, int64_t*, void*, size_t, cudaStream_t);
template void topk_ip_cuda<bf16_t>(const float*, const bf16_t*, const float*, int64_t, int64_t, int64_t, int64_t,
                                   bool, float*, int64_t*, void*, size_t, cudaStream_t);
template void topk_ip_cuda<int8_t>(const float*, const int8_t*, const float*, int64_t, int64_t, int64_t, int64_t,
                                   bool, float*, int64_t*, void*, size_t, cudaStream_t);

}  // namespace pyrag::topk
