// The weight-only qlinear for small M (decode; M <= 64 in m16 tiles) on tensor cores:
// split-K, every weight load in flight at once, x and the scales staged in shared memory.
//
// Why a second kernel (qlinear_kernel.cuh is the first): measured on an H100, that kernel
// ran W4 g128 at M = 1 at 0.8-1.0 TB/s. Its SASS shows why: every k16 step reads its A
// fragments (x) from global memory right before the mma that needs them, so each warp
// waits out one L1/L2 round trip per step; and at M = 16 each 16-channel block re-reads
// all of x (as many bytes from L2 as the bf16 weight has).
//
// Work split: a block of 8 warps covers 128 output channels (8 x 16, warps side by side
// along N), a K chunk of `segs` segments (segs * KU k) and one m16 tile of rows; grid
// (ceil(Np / 128), splits, ceil(M / 16)), splits = ceil(units / segs) (each m tile reads the
// weights again: the kernel is for small M). Each lane issues all its weight loads for the
// chunk first (2 x segs 16-byte loads, segs <= 8), then the block stages its x rows of the chunk
// and the chunk's scales into shared memory, so the mma loop waits on nothing but the
// weights. Per-lane decode and mma are those of the first kernel (qk:: helpers), so the
// numerics are the same: exact integer B operands, fp32 accumulation, the group scale
// applied to the fp32 partial sum of its group.
//
// With splits > 1 each block writes its fp32 partial sums to ws [splits, M, Np], and the
// last block to arrive for a (column block, m tile) (an atomic counter, zeroed by the caller) adds
// the partials in split order (deterministic), adds the bias and writes y.
//
// Shared memory (dynamic, 32-bit words):
//   x      min(16, M - m0) rows of x_stride words: 16-bit x as (k, k+1) pairs, x_stride = segs*KU/2 + 4
//          (= 4 mod 32: the 8 x 4 lanes of a fragment load hit 32 banks); fp32 x as floats,
//          x_stride = segs*KU + 8 (= 8 mod 32: conflict-free float2 half-warps). Columns past
//          K are zero.
//   scales gmax x P planes of 128 floats: s (and z) of the block's channels for the groups
//          the chunk touches, from group g_lo on.
#pragma once
#include "cuda/qlinear_kernel.cuh"

namespace hfquant::cuda {

constexpr int kSkinnyWarps = 8;                  // warps per block, side by side along N
constexpr int kSkinnyCols = 16 * kSkinnyWarps;   // output channels per block
constexpr int kSkinnyMaxSegs = 8;                // segments per block (all loads in registers)
constexpr int kSkinnyMaxM = 64;                  // m16 tiles along grid.z (each re-reads the weights)

struct SkinnyArgs {
  QLinearArgs q;   // x, w, scales, bias, y and sizes (q.wn unused); q.M <= kSkinnyMaxM
  int segs;        // segments per block, 1..kSkinnyMaxSegs
  int splits;      // blocks along K: ceil(q.units / segs)
  int gmax;        // group planes staged per block
  int x_stride;    // shared-memory words per x row
  float* ws;       // [splits, M, Np] partial sums (splits > 1)
  int* counters;   // [gridDim.z * gridDim.x] arrivals, zero on entry (splits > 1)
};

// Dynamic shared memory of a launch (bytes).
inline size_t skinny_smem_bytes(int M, int x_stride, int gmax, int P) {
  return size_t(M) * x_stride * 4 + size_t(gmax) * P * kSkinnyCols * 4;
}

template <typename XT, int BITS, bool PER_WORD>
void launch_qlinear_skinny(const SkinnyArgs& a, dim3 grid, size_t smem, cudaStream_t stream);
// Raises the kernel's dynamic shared-memory limit to `bytes` (needed above 48 KB).
template <typename XT, int BITS, bool PER_WORD>
cudaError_t allow_skinny_smem(int bytes);

#ifdef HFQUANT_QLINEAR_KERNEL_IMPL

namespace qk {

// A fragments of one m16 x k16 step from the staged x (rows >= M read as zero).
template <typename XT>
struct SmemA {
  __device__ static void load(const uint32_t* xs, int stride, int M, int g, int c0, uint32_t (&hi)[4],
                              uint32_t (&)[4]) {
    const uint32_t* p = xs + g * stride + (c0 >> 1);
    const bool m0 = g < M, m1 = g + 8 < M;
    hi[0] = m0 ? p[0] : 0u;
    hi[1] = m1 ? p[8 * stride] : 0u;
    hi[2] = m0 ? p[4] : 0u;
    hi[3] = m1 ? p[8 * stride + 4] : 0u;
  }
};

template <>
struct SmemA<float> {
  __device__ static void load(const uint32_t* xs, int stride, int M, int g, int c0, uint32_t (&hi)[4],
                              uint32_t (&lo)[4]) {
    const float* p = reinterpret_cast<const float*>(xs) + g * stride + c0;
    const bool m0 = g < M, m1 = g + 8 < M;
    const float2 z = make_float2(0.f, 0.f);
    XTraits<float>::split(m0 ? *reinterpret_cast<const float2*>(p) : z, hi[0], lo[0]);
    XTraits<float>::split(m1 ? *reinterpret_cast<const float2*>(p + 8 * stride) : z, hi[1], lo[1]);
    XTraits<float>::split(m0 ? *reinterpret_cast<const float2*>(p + 8) : z, hi[2], lo[2]);
    XTraits<float>::split(m1 ? *reinterpret_cast<const float2*>(p + 8 * stride + 8) : z, hi[3], lo[3]);
  }
};

__device__ __forceinline__ uint32_t word_of(const uint4& v, int j) {
  return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w;
}

}  // namespace qk

template <typename XT, int BITS, bool PER_WORD>
__global__ void __launch_bounds__(256, 2) qlinear_skinny_kernel(const SkinnyArgs sa) {
  using TR = qk::XTraits<XT>;
  using WD = qk::WDecode<TR::kBF16, BITS>;
  constexpr int KU = seg_k(BITS);
  constexpr int KW = BITS == 4 ? 32 : 16;
  constexpr bool kF32 = TR::kSplit;  // fp32 x: one word per element, else one per pair
  constexpr float kZSym = BITS == 4 ? 8.f : 128.f;
  const QLinearArgs& a = sa.q;

  extern __shared__ __align__(16) uint32_t smem[];
  __shared__ int last_flag;
  uint32_t* xs = smem;
  const int m0 = blockIdx.z * 16, mrows = min(16, a.M - m0);  // the block's rows of x and y
  float* ss = reinterpret_cast<float*>(smem + mrows * sa.x_stride);

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int nb0 = blockIdx.x * kSkinnyCols;     // first channel of the block
  const int n_base = nb0 + warp * 16;           // first channel of the warp
  const bool active = n_base < a.Np;            // the last block may reach past Np
  const int u_begin = blockIdx.y * sa.segs;
  const int s_cnt = min(sa.segs, a.units - u_begin);

  // 1. every weight load of the chunk, before anything waits
  uint4 w[kSkinnyMaxSegs][2];
  if (active) {
    const uint8_t* wrow = a.w + int64_t(n_base + g) * a.ldw + 16 * t + int64_t(u_begin) * kSegBytes;
#pragma unroll
    for (int i = 0; i < kSkinnyMaxSegs; ++i) {
      if (i < s_cnt) {
        w[i][0] = qk::ldg_stream(wrow + i * kSegBytes);
        w[i][1] = qk::ldg_stream(wrow + 8 * a.ldw + i * kSegBytes);
      }
    }
  }

  // 2. stage x (rows [m0, m0 + mrows), the chunk's columns, zero past K) and the scales; batches of
  //    kB loads per thread go out before their stores wait
  constexpr int kB = 8;
  const XT* x = static_cast<const XT*>(a.x);
  const int kc0 = u_begin * KU;
  const int kcw = kF32 ? s_cnt * KU : s_cnt * KU / 2;  // words per staged row
  const int xtotal = mrows * kcw;
  for (int base = threadIdx.x; base < xtotal; base += kB * blockDim.x) {
    uint32_t v[kB];
#pragma unroll
    for (int b = 0; b < kB; ++b) {
      const int idx = base + b * blockDim.x;
      const int r = idx / kcw, c = idx - r * kcw;
      const int k = kc0 + (kF32 ? c : 2 * c);
      v[b] = 0u;
      if (idx < xtotal && k < a.K) {  // K even: a pair never straddles it
        const XT* p = x + int64_t(m0 + r) * a.ldx + k;
        if constexpr (kF32) {
          v[b] = __float_as_uint(__ldg(p));
        } else {
          v[b] = __ldg(reinterpret_cast<const uint32_t*>(p));
        }
      }
    }
#pragma unroll
    for (int b = 0; b < kB; ++b) {
      const int idx = base + b * blockDim.x;
      if (idx < xtotal) {
        const int r = idx / kcw;
        xs[r * sa.x_stride + (idx - r * kcw)] = v[b];
      }
    }
  }
  const int g_lo = min((u_begin * KU) / a.gs, a.G - 1);
  const int g_hi = min(((u_begin + s_cnt) * KU - 1) / a.gs, a.G - 1);
  constexpr int kQ = kSkinnyCols / 4;          // float4 per (group, plane) row
  const int stotal = (g_hi - g_lo + 1) * a.P * kQ;  // rows <= gmax * P (host bound)
  for (int base = threadIdx.x; base < stotal; base += 4 * blockDim.x) {
    float4 v[4];
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const int idx = base + b * blockDim.x;
      const int row = idx / kQ, q = idx - row * kQ;
      const int n = nb0 + 4 * q;  // Np is a multiple of 64: a float4 is all in or all out
      v[b] = make_float4(0.f, 0.f, 0.f, 0.f);
      if (idx < stotal && n < a.Np) {
        const int gl = row / a.P, p = row - gl * a.P;
        v[b] = __ldg(reinterpret_cast<const float4*>(a.ps + (int64_t(g_lo + gl) * a.P + p) * a.Np + n));
      }
    }
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const int idx = base + b * blockDim.x;
      if (idx < stotal) reinterpret_cast<float4*>(ss)[idx] = v[b];
    }
  }
  __syncthreads();

  // 3. the mma loop: waits only on the weights
  float acc[2][4], part[2][4];
#pragma unroll
  for (int tile = 0; tile < 2; ++tile)
#pragma unroll
    for (int r = 0; r < 4; ++r) acc[tile][r] = part[tile][r] = 0.f;

  const int cw = warp * 16;  // the warp's first channel within the block
  auto zz_of = [&](int gl, int tile) {
    return WD::zz(a.P == 2 ? ss[(gl * 2 + 1) * kSkinnyCols + cw + tile * 8 + g] : kZSym);
  };
  auto flush = [&](int gl) {
#pragma unroll
    for (int tile = 0; tile < 2; ++tile) {
      const float2 s = *reinterpret_cast<const float2*>(ss + gl * a.P * kSkinnyCols + cw + tile * 8 + 2 * t);
      acc[tile][0] = fmaf(part[tile][0], s.x, acc[tile][0]);
      acc[tile][1] = fmaf(part[tile][1], s.y, acc[tile][1]);
      acc[tile][2] = fmaf(part[tile][2], s.x, acc[tile][2]);
      acc[tile][3] = fmaf(part[tile][3], s.y, acc[tile][3]);
#pragma unroll
      for (int r = 0; r < 4; ++r) part[tile][r] = 0.f;
    }
  };
  auto step = [&](int kl, uint32_t b00, uint32_t b01, uint32_t b10, uint32_t b11) {
    uint32_t hi[4], lo[4];
    qk::SmemA<XT>::load(xs, sa.x_stride, mrows, g, kl + 2 * t, hi, lo);
    qk::mma16816<TR::kBF16>(part[0], hi, b00, b01);
    qk::mma16816<TR::kBF16>(part[1], hi, b10, b11);
    if constexpr (TR::kSplit) {
      qk::mma16816<TR::kBF16>(part[0], lo, b00, b01);
      qk::mma16816<TR::kBF16>(part[1], lo, b10, b11);
    }
  };

  if (active) {
#pragma unroll
    for (int i = 0; i < kSkinnyMaxSegs; ++i) {
      if (i < s_cnt) {
        const int u = u_begin + i;
        int gl = min((u * KU) / a.gs, a.G - 1) - g_lo;
        uint32_t zz0 = zz_of(gl, 0), zz1 = zz_of(gl, 1);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          if constexpr (PER_WORD) {
            if (j > 0) {
              gl = min((u * KU + j * KW) / a.gs, a.G - 1) - g_lo;
              zz0 = zz_of(gl, 0);
              zz1 = zz_of(gl, 1);
            }
          }
          const uint32_t q0 = qk::word_of(w[i][0], j), q1 = qk::word_of(w[i][1], j);
          const int kl = i * KU + j * KW;  // column within the staged chunk
          if constexpr (BITS == 4) {
            uint32_t b0[4], b1[4];
            WD::decode(q0, zz0, b0);
            WD::decode(q1, zz1, b1);
            step(kl, b0[0], b0[1], b1[0], b1[1]);
            step(kl + 16, b0[2], b0[3], b1[2], b1[3]);
          } else {
            uint32_t b0[2], b1[2];
            WD::decode(q0, zz0, b0);
            WD::decode(q1, zz1, b1);
            step(kl, b0[0], b0[1], b1[0], b1[1]);
          }
          if constexpr (PER_WORD) flush(gl);
        }
        if constexpr (!PER_WORD) flush(gl);
      }
    }
  }

  // 4. out: C fragment c0,c1 = row g, columns 2t, 2t+1; c2,c3 = row g + 8
  XT* y = static_cast<XT*>(a.y);
  if (sa.splits == 1) {
    if (!active) return;
#pragma unroll
    for (int tile = 0; tile < 2; ++tile)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int row = g + (r >= 2 ? 8 : 0), col = n_base + tile * 8 + 2 * t + (r & 1);
        if (row < mrows && col < a.N) {
          float v = acc[tile][r];
          if (a.bias) v += a.bias[col];
          TR::store(y + int64_t(m0 + row) * a.N + col, v);
        }
      }
    return;
  }
  if (active) {
    float* wsb = sa.ws + int64_t(blockIdx.y) * a.M * a.Np;
#pragma unroll
    for (int tile = 0; tile < 2; ++tile)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int row = g + (r >= 2 ? 8 : 0), col = n_base + tile * 8 + 2 * t + (r & 1);
        if (row < mrows) __stcg(wsb + int64_t(m0 + row) * a.Np + col, acc[tile][r]);
      }
  }
  __threadfence();  // the partials are visible device-wide before the arrival counts
  __syncthreads();
  if (threadIdx.x == 0)
    last_flag = atomicAdd(sa.counters + blockIdx.z * gridDim.x + blockIdx.x, 1) == sa.splits - 1;
  __syncthreads();
  if (!last_flag) return;
  __threadfence();
  for (int e = threadIdx.x; e < mrows * kSkinnyCols; e += blockDim.x) {
    const int row = e / kSkinnyCols, col = nb0 + (e - row * kSkinnyCols);
    if (col >= a.N) continue;
    float v = 0.f;
    for (int s = 0; s < sa.splits; ++s) v += __ldcg(sa.ws + (int64_t(s) * a.M + m0 + row) * a.Np + col);
    if (a.bias) v += a.bias[col];
    TR::store(y + int64_t(m0 + row) * a.N + col, v);
  }
}

template <typename XT, int BITS, bool PER_WORD>
void launch_qlinear_skinny(const SkinnyArgs& a, dim3 grid, size_t smem, cudaStream_t stream) {
  qlinear_skinny_kernel<XT, BITS, PER_WORD><<<grid, 256, smem, stream>>>(a);
}

template <typename XT, int BITS, bool PER_WORD>
cudaError_t allow_skinny_smem(int bytes) {
  return cudaFuncSetAttribute(qlinear_skinny_kernel<XT, BITS, PER_WORD>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              bytes);
}

#define HFQUANT_INSTANTIATE_SKINNY_ONE(XT, BITS, PW)                                                  \
  template void launch_qlinear_skinny<XT, BITS, PW>(const SkinnyArgs&, dim3, size_t, cudaStream_t); \
  template cudaError_t allow_skinny_smem<XT, BITS, PW>(int);
#define HFQUANT_INSTANTIATE_SKINNY(XT)          \
  HFQUANT_INSTANTIATE_SKINNY_ONE(XT, 4, false)  \
  HFQUANT_INSTANTIATE_SKINNY_ONE(XT, 4, true)   \
  HFQUANT_INSTANTIATE_SKINNY_ONE(XT, 8, false)  \
  HFQUANT_INSTANTIATE_SKINNY_ONE(XT, 8, true)

#endif  // HFQUANT_QLINEAR_KERNEL_IMPL

}  // namespace hfquant::cuda
