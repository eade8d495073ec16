// The weight-only qlinear kernel on tensor cores (mma.sync m16n8k16), one template for
// every M: y[M, N] = x[M, K] @ ((v - z) * s)^T + bias.
//
// Numerics: the B operand is the integer v - z (|v - z| <= 255, exact in fp16 and bf16),
// the A operand x itself (fp16/bf16; fp32 x is split into bf16 hi + lo, two mma), so each
// product is exact and accumulates in fp32; the group's scale multiplies the fp32 partial
// sum of its group. Nothing is rounded to 16 bits except what the caller passed in, and
// large scales cannot overflow a 16-bit weight.
//
// Work split: a block of 8 warps covers 16 * WN output channels (WN warps side by side,
// each 16 channels = two n8 tiles) and 16 * MT rows of x; the 8 / WN warps over the same
// channels split K and add their partial sums through shared memory at the end. Each lane
// streams its weights with one 16-byte load per tile and segment (layout in
// qlinear_layout.cuh), NST segments in flight per warp, and reads its A fragments
// straight from global memory (x is small and shared by all blocks: L1/L2 hits).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/qlinear_layout.cuh"

namespace hfquant::cuda {

struct QLinearArgs {
  const void* x;      // [M, ldx] (K used), 16-bit or fp32, ldx even, 8-byte aligned rows
  int64_t ldx;
  int M, K;           // K even (the caller pads x otherwise)
  const uint8_t* w;   // [Np, ldw]
  int64_t ldw;        // bytes per row = Kp * bits / 8
  const float* ps;    // [G, P, Np]
  int Np, G, P, gs;   // gs: group length in k (Kp for per channel)
  int units;          // Kp / KU segments per row
  int wn;             // warps side by side along N (1, 2, 4); 8 / wn split K
  const float* bias;  // [N] float32 or null
  void* y;            // [M, N] in x's dtype
  int N;
};

template <typename XT, int BITS, int MT, bool PER_WORD>
void launch_qlinear_mma(const QLinearArgs& a, dim3 grid, cudaStream_t stream);

#ifdef HFQUANT_QLINEAR_KERNEL_IMPL

namespace qk {

__device__ __forceinline__ uint32_t lop3_and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;  // (a & b) | c in one instruction
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

template <bool BF16>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (BF16) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

__device__ __forceinline__ uint4 ldg_stream(const void* p) {
  uint4 r;  // weights are read once per call: keep them out of L1
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
  return r;
}

__device__ __forceinline__ uint32_t u32_of(__half2 h) { return *reinterpret_cast<uint32_t*>(&h); }
__device__ __forceinline__ uint32_t u32_of(__nv_bfloat162 h) { return *reinterpret_cast<uint32_t*>(&h); }

// The activation side: x type -> mma operand type, A-fragment loads.
template <typename XT>
struct XTraits;

template <>
struct XTraits<__half> {
  static constexpr bool kBF16 = false, kSplit = false;
  __device__ static void load_a(const __half* x, int64_t ldx, int M, int K, int r0, int c0, uint32_t (&hi)[4],
                                uint32_t (&)[4]) {
    // a0a1: (r0, c0..c0+1), a2a3: (r0+8, c0), a4a5: (r0, c0+8), a6a7: (r0+8, c0+8)
    const bool m0 = r0 < M, m1 = r0 + 8 < M, k0 = c0 < K, k1 = c0 + 8 < K;
    const __half* p = x + int64_t(r0) * ldx + c0;
    hi[0] = m0 && k0 ? __ldg(reinterpret_cast<const uint32_t*>(p)) : 0u;
    hi[1] = m1 && k0 ? __ldg(reinterpret_cast<const uint32_t*>(p + 8 * ldx)) : 0u;
    hi[2] = m0 && k1 ? __ldg(reinterpret_cast<const uint32_t*>(p + 8)) : 0u;
    hi[3] = m1 && k1 ? __ldg(reinterpret_cast<const uint32_t*>(p + 8 * ldx + 8)) : 0u;
  }
  __device__ static void store(__half* y, float v) { *y = __float2half_rn(v); }
};

template <>
struct XTraits<__nv_bfloat16> {
  static constexpr bool kBF16 = true, kSplit = false;
  __device__ static void load_a(const __nv_bfloat16* x, int64_t ldx, int M, int K, int r0, int c0,
                                uint32_t (&hi)[4], uint32_t (&)[4]) {
    const bool m0 = r0 < M, m1 = r0 + 8 < M, k0 = c0 < K, k1 = c0 + 8 < K;
    const __nv_bfloat16* p = x + int64_t(r0) * ldx + c0;
    hi[0] = m0 && k0 ? __ldg(reinterpret_cast<const uint32_t*>(p)) : 0u;
    hi[1] = m1 && k0 ? __ldg(reinterpret_cast<const uint32_t*>(p + 8 * ldx)) : 0u;
    hi[2] = m0 && k1 ? __ldg(reinterpret_cast<const uint32_t*>(p + 8)) : 0u;
    hi[3] = m1 && k1 ? __ldg(reinterpret_cast<const uint32_t*>(p + 8 * ldx + 8)) : 0u;
  }
  __device__ static void store(__nv_bfloat16* y, float v) { *y = __float2bfloat16_rn(v); }
};

template <>
struct XTraits<float> {
  // fp32 x = hi + lo with hi = bf16(x), lo = bf16(x - hi): |x - hi - lo| <= 2^-16 |x|.
  static constexpr bool kBF16 = true, kSplit = true;
  __device__ static void split(float2 v, uint32_t& hi, uint32_t& lo) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(v.x, v.y);
    const float2 hf = __bfloat1622float2(h);
    const __nv_bfloat162 l = __floats2bfloat162_rn(v.x - hf.x, v.y - hf.y);
    hi = u32_of(h);
    lo = u32_of(l);
  }
  __device__ static void load_a(const float* x, int64_t ldx, int M, int K, int r0, int c0, uint32_t (&hi)[4],
                                uint32_t (&lo)[4]) {
    const bool m0 = r0 < M, m1 = r0 + 8 < M, k0 = c0 < K, k1 = c0 + 8 < K;
    const float* p = x + int64_t(r0) * ldx + c0;
    const float2 z = make_float2(0.f, 0.f);
    split(m0 && k0 ? __ldg(reinterpret_cast<const float2*>(p)) : z, hi[0], lo[0]);
    split(m1 && k0 ? __ldg(reinterpret_cast<const float2*>(p + 8 * ldx)) : z, hi[1], lo[1]);
    split(m0 && k1 ? __ldg(reinterpret_cast<const float2*>(p + 8)) : z, hi[2], lo[2]);
    split(m1 && k1 ? __ldg(reinterpret_cast<const float2*>(p + 8 * ldx + 8)) : z, hi[3], lo[3]);
  }
  __device__ static void store(float* y, float v) { *y = v; }
};

// The weight side: 16-bit pairs of v - z from one packed word.
template <bool BF16, int BITS>
struct WDecode;

// 4-bit: (word >> 4i) & 0x000F000F | magic gives two 16-bit floats of value base + v
// (fp16: 0x6400 = 1024, ulp 1; bf16: 0x4300 = 128, ulp 1); subtracting base + z is exact.
template <bool BF16>
struct WDecode<BF16, 4> {
  __device__ static uint32_t zz(float z) {
    if constexpr (BF16) {
      return u32_of(__float2bfloat162_rn(128.f + z));
    } else {
      return u32_of(__float2half2_rn(1024.f + z));
    }
  }
  // b[0..3]: B registers of step 0 (b[0], b[1]) and step 1 (b[2], b[3])
  __device__ static void decode(uint32_t q, uint32_t zz2, uint32_t (&b)[4]) {
    constexpr uint32_t kMagic = BF16 ? 0x43004300u : 0x64006400u;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t h = lop3_and_or(q >> (4 * i), 0x000F000Fu, kMagic);
      if constexpr (BF16) {
        const __nv_bfloat162 d = __hsub2(*reinterpret_cast<const __nv_bfloat162*>(&h),
                                         *reinterpret_cast<const __nv_bfloat162*>(&zz2));
        b[i] = u32_of(d);
      } else {
        const __half2 d = __hsub2(*reinterpret_cast<const __half2*>(&h), *reinterpret_cast<const __half2*>(&zz2));
        b[i] = u32_of(d);
      }
    }
  }
};

// 8-bit: fp16 uses the 0x64vv magic (1024 + v, v < 1024); bf16 has too few mantissa bits
// for 256 + v, so the pair goes through fp32 (0x4B0000vv = 2^23 + v) and is packed.
template <bool BF16>
struct WDecode<BF16, 8> {
  __device__ static uint32_t zz(float z) {
    if constexpr (BF16) {
      return __float_as_uint(8388608.f + z);
    } else {
      return u32_of(__float2half2_rn(1024.f + z));
    }
  }
  // b[0], b[1]: the two B registers of the word's k16 step
  __device__ static void decode(uint32_t q, uint32_t zz2, uint32_t (&b)[2]) {
    if constexpr (BF16) {
      const float base = __uint_as_float(zz2);
      float f[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) f[i] = __uint_as_float(__byte_perm(q, 0x4B000000u, 0x7440u | i)) - base;
      b[0] = u32_of(__floats2bfloat162_rn(f[0], f[1]));
      b[1] = u32_of(__floats2bfloat162_rn(f[2], f[3]));
    } else {
      const uint32_t h0 = __byte_perm(q, 0x64646464u, 0x4140u), h1 = __byte_perm(q, 0x64646464u, 0x4342u);
      b[0] = u32_of(__hsub2(*reinterpret_cast<const __half2*>(&h0), *reinterpret_cast<const __half2*>(&zz2)));
      b[1] = u32_of(__hsub2(*reinterpret_cast<const __half2*>(&h1), *reinterpret_cast<const __half2*>(&zz2)));
    }
  }
};

// One segment's worth of loads for the warp's two n8 tiles, with the scales (and zero
// points) of the groups it touches: one group per segment, or one per packed word.
template <bool PER_WORD>
struct Stage {
  static constexpr int kG = PER_WORD ? 4 : 1;
  uint4 w[2];
  float2 s[kG][2];  // scales of channels 2t, 2t+1 of each tile (the C fragment's columns)
  float z[kG][2];   // zero point of channel g of each tile (the B fragment's column)
};

}  // namespace qk

template <typename XT, int BITS, int MT, bool PER_WORD>
__global__ void __launch_bounds__(256) qlinear_mma_kernel(const QLinearArgs a) {
  using TR = qk::XTraits<XT>;
  using WD = qk::WDecode<TR::kBF16, BITS>;
  using St = qk::Stage<PER_WORD>;
  constexpr int KU = seg_k(BITS);           // k per segment
  constexpr int KW = BITS == 4 ? 32 : 16;   // k per packed word
  constexpr int NST = MT == 1 ? 4 : MT == 2 ? 3 : 2;  // segments in flight per warp (registers allow)
  constexpr float kZSym = BITS == 4 ? 8.f : 128.f;

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int wn_i = warp % a.wn, wk_i = warp / a.wn, WK = 8 / a.wn;
  const int n_base = (blockIdx.x * a.wn + wn_i) * 16;
  const int m_base = blockIdx.y * 16 * MT;
  const int u0 = int(int64_t(a.units) * wk_i / WK), u1 = int(int64_t(a.units) * (wk_i + 1) / WK);
  const XT* x = static_cast<const XT*>(a.x);

  float acc[MT][2][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.f;

  const uint8_t* wrow = a.w + int64_t(n_base + g) * a.ldw + 16 * t;
  const int64_t plane = int64_t(a.Np);

  auto load = [&](St& st, int u) {
    st.w[0] = qk::ldg_stream(wrow + int64_t(u) * kSegBytes);
    st.w[1] = qk::ldg_stream(wrow + 8 * a.ldw + int64_t(u) * kSegBytes);
#pragma unroll
    for (int j = 0; j < St::kG; ++j) {
      const int gi = min((u * KU + j * KW) / a.gs, a.G - 1);
      const float* sp = a.ps + int64_t(gi) * a.P * plane;
#pragma unroll
      for (int tile = 0; tile < 2; ++tile) {
        st.s[j][tile] = __ldg(reinterpret_cast<const float2*>(sp + n_base + tile * 8 + 2 * t));
        st.z[j][tile] = a.P == 2 ? __ldg(sp + plane + n_base + tile * 8 + g) : kZSym;
      }
    }
  };

  float part[MT][2][4];
  auto flush = [&](const St& st, int j) {
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int tile = 0; tile < 2; ++tile) {
        const float2 s = st.s[j][tile];
        acc[i][tile][0] = fmaf(part[i][tile][0], s.x, acc[i][tile][0]);
        acc[i][tile][1] = fmaf(part[i][tile][1], s.y, acc[i][tile][1]);
        acc[i][tile][2] = fmaf(part[i][tile][2], s.x, acc[i][tile][2]);
        acc[i][tile][3] = fmaf(part[i][tile][3], s.y, acc[i][tile][3]);
#pragma unroll
        for (int r = 0; r < 4; ++r) part[i][tile][r] = 0.f;
      }
  };

  // one k16 step: A fragments of every m tile times the two tiles' B registers
  auto step = [&](int k0, const uint32_t (&b0)[2], const uint32_t (&b1)[2]) {
#pragma unroll
    for (int i = 0; i < MT; ++i) {
      uint32_t hi[4], lo[4];
      TR::load_a(x, a.ldx, a.M, a.K, m_base + i * 16 + g, k0 + 2 * t, hi, lo);
      qk::mma16816<TR::kBF16>(part[i][0], hi, b0[0], b0[1]);
      qk::mma16816<TR::kBF16>(part[i][1], hi, b1[0], b1[1]);
      if constexpr (TR::kSplit) {
        qk::mma16816<TR::kBF16>(part[i][0], lo, b0[0], b0[1]);
        qk::mma16816<TR::kBF16>(part[i][1], lo, b1[0], b1[1]);
      }
    }
  };

  auto compute = [&](const St& st, int u) {
    uint32_t zz[2] = {WD::zz(st.z[0][0]), WD::zz(st.z[0][1])};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if constexpr (PER_WORD) {
        if (j > 0) {
          zz[0] = WD::zz(st.z[j][0]);
          zz[1] = WD::zz(st.z[j][1]);
        }
      }
      const uint32_t q0 = j == 0 ? st.w[0].x : j == 1 ? st.w[0].y : j == 2 ? st.w[0].z : st.w[0].w;
      const uint32_t q1 = j == 0 ? st.w[1].x : j == 1 ? st.w[1].y : j == 2 ? st.w[1].z : st.w[1].w;
      const int kw = u * KU + j * KW;
      if constexpr (BITS == 4) {
        uint32_t b0[4], b1[4];
        WD::decode(q0, zz[0], b0);
        WD::decode(q1, zz[1], b1);
        step(kw, {b0[0], b0[1]}, {b1[0], b1[1]});
        step(kw + 16, {b0[2], b0[3]}, {b1[2], b1[3]});
      } else {
        uint32_t b0[2], b1[2];
        WD::decode(q0, zz[0], b0);
        WD::decode(q1, zz[1], b1);
        step(kw, b0, b1);
      }
      if constexpr (PER_WORD) flush(st, j);
    }
    if constexpr (!PER_WORD) flush(st, 0);
  };

#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) part[i][j][r] = 0.f;

  // NST-deep ring of segments, unrolled so every stage index is a constant
  St st[NST];
#pragma unroll
  for (int i = 0; i < NST - 1; ++i)
    if (u0 + i < u1) load(st[i], u0 + i);
  for (int u = u0; u < u1; u += NST) {
#pragma unroll
    for (int i = 0; i < NST; ++i) {
      if (u + i < u1) {
        if (u + i + NST - 1 < u1) load(st[(i + NST - 1) % NST], u + i + NST - 1);
        compute(st[i], u + i);
      }
    }
  }

  // partial sums of the K-splitting warps -> shared memory -> the first warp of each column
  __shared__ float red[8][MT * 8][32];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int tile = 0; tile < 2; ++tile)
#pragma unroll
      for (int r = 0; r < 4; ++r) red[warp][(i * 2 + tile) * 4 + r][lane] = acc[i][tile][r];
  __syncthreads();
  if (wk_i != 0) return;
  XT* y = static_cast<XT*>(a.y);
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int tile = 0; tile < 2; ++tile)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        float v = 0.f;
        for (int w = 0; w < WK; ++w) v += red[w * a.wn + wn_i][(i * 2 + tile) * 4 + r][lane];
        const int row = m_base + i * 16 + g + (r >= 2 ? 8 : 0);
        const int col = n_base + tile * 8 + 2 * t + (r & 1);
        if (row < a.M && col < a.N) {
          if (a.bias) v += a.bias[col];
          TR::store(y + int64_t(row) * a.N + col, v);
        }
      }
}

template <typename XT, int BITS, int MT, bool PER_WORD>
void launch_qlinear_mma(const QLinearArgs& a, dim3 grid, cudaStream_t stream) {
  qlinear_mma_kernel<XT, BITS, MT, PER_WORD><<<grid, 256, 0, stream>>>(a);
}

#define HFQUANT_INSTANTIATE_QLINEAR(XT)                                                          \
  template void launch_qlinear_mma<XT, 4, 1, false>(const QLinearArgs&, dim3, cudaStream_t);    \
  template void launch_qlinear_mma<XT, 4, 1, true>(const QLinearArgs&, dim3, cudaStream_t);     \
  template void launch_qlinear_mma<XT, 4, 2, false>(const QLinearArgs&, dim3, cudaStream_t);    \
  template void launch_qlinear_mma<XT, 4, 2, true>(const QLinearArgs&, dim3, cudaStream_t);     \
  template void launch_qlinear_mma<XT, 4, 4, false>(const QLinearArgs&, dim3, cudaStream_t);    \
  template void launch_qlinear_mma<XT, 4, 4, true>(const QLinearArgs&, dim3, cudaStream_t);     \
  template void launch_qlinear_mma<XT, 8, 1, false>(const QLinearArgs&, dim3, cudaStream_t);    \
  template void launch_qlinear_mma<XT, 8, 1, true>(const QLinearArgs&, dim3, cudaStream_t);     \
  template void launch_qlinear_mma<XT, 8, 2, false>(const QLinearArgs&, dim3, cudaStream_t);    \
  template void launch_qlinear_mma<XT, 8, 2, true>(const QLinearArgs&, dim3, cudaStream_t);     \
  template void launch_qlinear_mma<XT, 8, 4, false>(const QLinearArgs&, dim3, cudaStream_t);    \
  template void launch_qlinear_mma<XT, 8, 4, true>(const QLinearArgs&, dim3, cudaStream_t);

#endif  // HFQUANT_QLINEAR_KERNEL_IMPL

}  // namespace hfquant::cuda
