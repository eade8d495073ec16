// hfquant::repack and hfquant::qlinear on CUDA: argument checks, the layout conversion
// (qlinear_layout.cuh) and the choice between the skinny split-K kernel (M <= the
// cuda_skinny_max_m switch, at most 64), the mma.sync kernel (every other M for fp32 x, M below
// the cuda_gemm_min_m switch for bf16/fp16; switches.h) and dequantize-once + cuBLAS for large M.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <atomic>

#include "cuda/common.cuh"
#include "cuda/qlinear_kernel.cuh"
#include "cuda/qlinear_layout.cuh"
#include "cuda/qlinear_skinny.cuh"

namespace hfquant::cuda {
namespace {

void check_bits_group(const char* op, int64_t bits, int64_t group_size) {
  HQ_CHECK(bits == 4 || bits == 8, "hfquant::", op, ": bits=", bits, " is not supported (use 4 or 8)");
  HQ_CHECK(group_size == -1 || (group_size > 0 && group_size % 32 == 0), "hfquant::", op,
              ": group_size=", group_size, " must be -1 (per channel) or a positive multiple of 32");
}

int64_t num_groups(int64_t group_size, int64_t K) { return group_size == -1 ? 1 : ceil_div(K, group_size); }

// One thread per output byte of the packed weight: gathers its codes from the canonical
// qweight (4-bit: two nibbles; 8-bit: one byte, symmetric int8 flipped to v = q + 128).
__global__ void repack_weight_kernel(const uint8_t* __restrict__ q, int64_t qcols, int N, int K, int bits,
                                     bool sym8, uint8_t* __restrict__ out, int64_t ldw, int64_t total) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const int64_t n = i / ldw, byte = i % ldw;
  if (n >= N) {
    out[i] = 0;
    return;
  }
  const uint8_t* row = q + n * qcols;
  // invert code_position: which k sits in this byte (per nibble for 4-bit)
  const int64_t u = byte / kSegBytes;
  const int sb = int(byte % kSegBytes), t = sb / 16, j = (sb % 16) / 4, b = sb % 4;
  if (bits == 4) {
    uint8_t v = 0;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int p = 2 * b + h;
      const int64_t k = u * 128 + 32 * j + 2 * t + (p >= 4 ? 1 : 0) + 8 * (p % 4);
      if (k < K) {
        const uint8_t c = row[k / 2];
        v |= uint8_t(((k & 1) ? (c >> 4) : (c & 0x0F)) << (4 * h));
      }
    }
    out[i] = v;
  } else {
    const int64_t k = u * 64 + 16 * j + 2 * t + (b & 1) + 8 * (b >> 1);
    out[i] = k < K ? uint8_t(sym8 ? (row[k] ^ 0x80) : row[k]) : uint8_t(0);
  }
}

// packed_scales [G, P, Np]: s (and z for P = 2) in float32; padded rows 0.
template <typename S>
__global__ void repack_scales_kernel(const S* __restrict__ s, const uint8_t* __restrict__ z, int N, int Np, int G,
                                     int P, float* __restrict__ out) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= int64_t(G) * Np) return;
  const int gi = int(i / Np), n = int(i % Np);
  float sv = 0.f, zv = 0.f;
  if (n < N) {
    sv = float(s[int64_t(n) * G + gi]);
    if (z) zv = float(z[int64_t(n) * G + gi]);
  }
  out[(int64_t(gi) * P) * Np + n] = sv;
  if (P == 2) out[(int64_t(gi) * P + 1) * Np + n] = zv;
}

__device__ __forceinline__ uint32_t pack2(__half a, __half b) {
  const __half2 h = __halves2half2(a, b);
  return *reinterpret_cast<const uint32_t*>(&h);
}
__device__ __forceinline__ uint32_t pack2(__nv_bfloat16 a, __nv_bfloat16 b) {
  const __nv_bfloat162 h = __halves2bfloat162(a, b);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// The float weight [N, K] in T: (v - z) * s rounded once (the large-M path's GEMM operand).
// One thread per (row, 64-byte segment): four 16-byte loads, the segment's KU codes
// decoded into natural k order in registers, written as contiguous 16-byte stores.
template <typename T, int BITS>
__global__ void dequant_kernel(const uint8_t* __restrict__ w, int64_t ldw, const float* __restrict__ ps, int Np,
                               int P, int gs, int G, int N, int K, int units, T* __restrict__ out) {
  constexpr int KU = seg_k(BITS);
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= int64_t(N) * units) return;
  const int64_t n = i / units;
  const int u = int(i % units);
  uint32_t words[16];
  const uint4* src = reinterpret_cast<const uint4*>(w + n * ldw + int64_t(u) * kSegBytes);
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const uint4 v = __ldg(src + q);
    words[4 * q] = v.x;
    words[4 * q + 1] = v.y;
    words[4 * q + 2] = v.z;
    words[4 * q + 3] = v.w;
  }
  const float zsym = BITS == 4 ? 8.f : 128.f;
  float sc = 0.f, z = 0.f;
  T* dst = out + n * K + int64_t(u) * KU;
  const int kmax = min(KU, K - u * KU);
  const bool vec = kmax == KU && (K % 8) == 0;
  // eight codes at a time (registers stay few), stored as one 16-byte write
#pragma unroll
  for (int q = 0; q < KU / 8; ++q) {
    T vals[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int kk = 8 * q + e;
      // code_position for a compile-time kk: byte 16t + 4j + b of the segment
      int byte, shift;
      if constexpr (BITS == 4) {
        const int j = kk / 32, r = kk % 32, t = (r % 8) / 2, p = r / 8 + 4 * (r % 2);
        byte = 16 * t + 4 * j + p / 2;
        shift = (p % 2) * 4;
      } else {
        const int j = kk / 16, r = kk % 16, t = (r % 8) / 2, b = r % 2 + 2 * (r / 8);
        byte = 16 * t + 4 * j + b;
        shift = 0;
      }
      const int code = int((words[byte / 4] >> (8 * (byte % 4) + shift)) & (BITS == 4 ? 0x0Fu : 0xFFu));
      if (kk % 32 == 0) {  // groups are whole multiples of 32 k
        const int64_t k = int64_t(u) * KU + kk;
        const int gi = min(int(k / gs), G - 1);
        sc = ps[int64_t(gi) * P * Np + n];
        z = P == 2 ? ps[(int64_t(gi) * P + 1) * Np + n] : zsym;
      }
      vals[e] = T((float(code) - z) * sc);
    }
    if (vec) {
      uint4 v;
      v.x = pack2(vals[0], vals[1]);
      v.y = pack2(vals[2], vals[3]);
      v.z = pack2(vals[4], vals[5]);
      v.w = pack2(vals[6], vals[7]);
      reinterpret_cast<uint4*>(dst)[q] = v;
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e)
        if (8 * q + e < kmax) dst[8 * q + e] = vals[e];
    }
  }
}

// Segments per block of the skinny kernel: the fewest waves x (segments + a fixed cost of
// about two segments per block: staging, the barrier, the partial sums), assuming two
// blocks per SM; ties go to more segments (fewer partial sums).
int choose_skinny_segs(int64_t col_blocks, int64_t units, int sms) {
  const int64_t slots = 2 * int64_t(std::max(sms, 1));
  int best = 1;
  int64_t best_cost = -1;
  for (int s = kSkinnyMaxSegs; s >= 1; --s) {
    const int64_t blocks = col_blocks * ceil_div(units, s);
    const int64_t cost = ceil_div(blocks, slots) * (s + 2);
    if (best_cost < 0 || cost < best_cost) {
      best = s;
      best_cost = cost;
    }
  }
  return int(std::min<int64_t>(best, units));
}

template <typename F>
void dispatch_x(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(static_cast<float*>(nullptr)); break;
    case at::kBFloat16: f(static_cast<__nv_bfloat16*>(nullptr)); break;
    case at::kHalf: f(static_cast<__half*>(nullptr)); break;
    default: HQ_CHECK(false, "hfquant::qlinear: x must be float32, bfloat16 or float16, got ", t);
  }
}

}  // namespace

// qweight: 4-bit uint8 [N, ceil(K/2)]; 8-bit int8 [N, K] (symmetric) or uint8 [N, K] (asymmetric);
// scales : float32/bfloat16/float16 [N, G]; zeros: optional uint8 [N, G].
// Returns (packed_weight uint8 [Np, Kp*bits/8], packed_scales float32 [G, 1 or 2, Np]),
// layout in qlinear_layout.cuh. All on qweight's CUDA device.
std::tuple<at::Tensor, at::Tensor> repack_cuda(const at::Tensor& qweight, const at::Tensor& scales,
                                               const std::optional<at::Tensor>& zeros, int64_t bits,
                                               int64_t group_size, int64_t in_features,
                                               const std::optional<at::Tensor>& offsets) {
  check_bits_group("repack", bits, group_size);
  // The tensor-core path multiplies integer (v - z) in fp16/bf16: a float offset does not fit it.
  HQ_CHECK(!offsets, "hfquant::repack: float offsets (zero_point=\"float\") are not supported by the CUDA "
           "kernels yet; quantize with zero_point=\"integer\" to run on CUDA");
  const int64_t K = in_features;
  HQ_CHECK(K > 0, "hfquant::repack: in_features=", K, " must be positive");
  const at::Device dev = cuda_device({&qweight, &scales, opt(zeros)});
  check_device("repack", "qweight", qweight, dev);
  check_device("repack", "scales", scales, dev);
  if (zeros) check_device("repack", "zeros", *zeros, dev);
  check_capability("repack", dev);
  HQ_CHECK(qweight.dim() == 2, "hfquant::repack: qweight must be 2-D, got ", qweight.dim(), "-D");
  const int64_t N = qweight.size(0);
  HQ_CHECK(N > 0, "hfquant::repack: qweight has no rows");
  if (bits == 4) {
    HQ_CHECK(qweight.scalar_type() == at::kByte, "hfquant::repack: 4-bit qweight must be uint8, got ",
                qweight.scalar_type());
    HQ_CHECK(qweight.size(1) == (K + 1) / 2, "hfquant::repack: 4-bit qweight has ", qweight.size(1),
                " columns, expected ceil(in_features/2)=", (K + 1) / 2);
  } else {
    const bool asym = zeros.has_value();
    HQ_CHECK(qweight.scalar_type() == (asym ? at::kByte : at::kChar), "hfquant::repack: 8-bit ",
                asym ? "asymmetric qweight must be uint8" : "symmetric qweight must be int8", ", got ",
                qweight.scalar_type());
    HQ_CHECK(qweight.size(1) == K, "hfquant::repack: 8-bit qweight has ", qweight.size(1),
                " columns, expected in_features=", K);
  }
  const int64_t G = num_groups(group_size, K);
  HQ_CHECK(scales.dim() == 2 && scales.size(0) == N && scales.size(1) == G, "hfquant::repack: scales has shape ",
              scales.sizes(), ", expected [", N, ", ", G, "]");
  HQ_CHECK(is_float(scales.scalar_type()), "hfquant::repack: scales must be float32, bfloat16 or float16, got ",
              scales.scalar_type());
  if (zeros) {
    HQ_CHECK(zeros->scalar_type() == at::kByte, "hfquant::repack: zeros must be uint8, got ",
                zeros->scalar_type());
    HQ_CHECK(zeros->dim() == 2 && zeros->size(0) == N && zeros->size(1) == G, "hfquant::repack: zeros has shape ",
                zeros->sizes(), ", expected [", N, ", ", G, "]");
  }
  HQ_CHECK(N < (int64_t(1) << 31) / 2 && K < (int64_t(1) << 31) / 2, "hfquant::repack: layer too large");
  const c10::cuda::CUDAGuard guard(dev);
  at::Tensor zc;
  if (zeros) {
    zc = zeros->contiguous();
    // zero points out of range would decode to garbage: refuse them (checked on a host
    // copy at load time, with the CPU op's message)
    const int zmax = bits == 4 ? 15 : 255;
    const at::Tensor zh = zc.to(at::kCPU);
    const uint8_t* zp = zh.data_ptr<uint8_t>();
    for (int64_t i = 0; i < zh.numel(); ++i)
      HQ_CHECK(zp[i] <= zmax, "hfquant::repack: zero point ", int(zp[i]), " at index ", i, " is out of range for ",
                  bits, "-bit (0..", zmax, ")");
  }
  const int64_t Np = round_up(N, kRowPad), Kp = round_up(K, seg_k(int(bits)));
  const int64_t ldw = Kp * bits / 8;
  const int P = zeros ? 2 : 1;
  const at::Tensor qw = qweight.contiguous();
  at::Tensor w = at::empty({Np, ldw}, qweight.options().dtype(at::kByte));
  at::Tensor ps = at::empty({G, P, Np}, scales.options().dtype(at::kFloat));
  const int64_t total = Np * ldw;
  repack_weight_kernel<<<ceil_div(total, 256), 256, 0, stream()>>>(
      reinterpret_cast<const uint8_t*>(qw.data_ptr()), qw.size(1), int(N), int(K), int(bits),
      bits == 8 && !zeros, w.data_ptr<uint8_t>(), ldw, total);
  HFQUANT_CUDA_CHECK_LAUNCH();
  const at::Tensor sc = scales.contiguous();
  const uint8_t* zp = zeros ? zc.data_ptr<uint8_t>() : nullptr;
  const int64_t ns = G * Np;
  switch (sc.scalar_type()) {
    case at::kFloat:
      repack_scales_kernel<float><<<ceil_div(ns, 256), 256, 0, stream()>>>(sc.data_ptr<float>(), zp, int(N), int(Np),
                                                                           int(G), P, ps.data_ptr<float>());
      break;
    case at::kBFloat16:
      repack_scales_kernel<c10::BFloat16><<<ceil_div(ns, 256), 256, 0, stream()>>>(
          sc.data_ptr<c10::BFloat16>(), zp, int(N), int(Np), int(G), P, ps.data_ptr<float>());
      break;
    default:
      repack_scales_kernel<c10::Half><<<ceil_div(ns, 256), 256, 0, stream()>>>(
          sc.data_ptr<c10::Half>(), zp, int(N), int(Np), int(G), P, ps.data_ptr<float>());
  }
  HFQUANT_CUDA_CHECK_LAUNCH();
  return {w, ps};
}

// x [..., K] float32/bfloat16/float16; packed_weight uint8 [Np, Kp*bits/8] and packed_scales
// float32 [G, 1|2, Np] from repack_cuda; bias optional [N] floating.
// Returns y [..., N] in x.dtype: x @ ((v - z) * s)^T + bias.
at::Tensor qlinear_cuda(const at::Tensor& x, const at::Tensor& packed_weight, const at::Tensor& packed_scales,
                        const std::optional<at::Tensor>& bias, int64_t bits, int64_t group_size, int64_t out_features,
                        int64_t in_features) {
  check_bits_group("qlinear", bits, group_size);
  const int64_t N = out_features, K = in_features;
  HQ_CHECK(N > 0 && K > 0, "hfquant::qlinear: out_features=", N, " and in_features=", K, " must be positive");
  HQ_CHECK(is_float(x.scalar_type()), "hfquant::qlinear: x must be float32, bfloat16 or float16, got ",
              x.scalar_type());
  HQ_CHECK(x.dim() >= 1 && x.size(-1) == K, "hfquant::qlinear: x has last dimension ", x.dim() ? x.size(-1) : 0,
              ", expected in_features=", K);
  const at::Device dev = cuda_device({&x, &packed_weight, &packed_scales, opt(bias)});
  check_device("qlinear", "x", x, dev);
  check_device("qlinear", "packed_weight", packed_weight, dev);
  check_device("qlinear", "packed_scales", packed_scales, dev);
  if (bias) check_device("qlinear", "bias", *bias, dev);
  check_capability("qlinear", dev);
  const int64_t Np = round_up(N, kRowPad), KU = seg_k(int(bits)), Kp = round_up(K, KU), ldw = Kp * bits / 8;
  const int64_t G = num_groups(group_size, K);
  HQ_CHECK(packed_weight.scalar_type() == at::kByte && packed_weight.is_contiguous() && packed_weight.dim() == 2,
              "hfquant::qlinear: packed_weight must be a contiguous uint8 CUDA tensor from hfquant::repack, got ",
              packed_weight.scalar_type(), " ", packed_weight.sizes());
  HQ_CHECK(packed_weight.size(0) == Np && packed_weight.size(1) == ldw, "hfquant::qlinear: packed_weight has shape ",
              packed_weight.sizes(), ", expected [", Np, ", ", ldw, "] for out_features=", N, ", in_features=", K,
              ", bits=", bits);
  HQ_CHECK(packed_scales.scalar_type() == at::kFloat && packed_scales.is_contiguous() && packed_scales.dim() == 3,
              "hfquant::qlinear: packed_scales must be a contiguous float32 CUDA tensor [G, 1|2, Np] from "
              "hfquant::repack, got ", packed_scales.scalar_type(), " ", packed_scales.sizes());
  const int64_t P = packed_scales.size(1);
  HQ_CHECK(packed_scales.size(0) == G && (P == 1 || P == 2) && packed_scales.size(2) == Np,
              "hfquant::qlinear: packed_scales has shape ", packed_scales.sizes(), ", expected [", G, ", 1 or 2, ", Np,
              "]");
  at::Tensor b;
  if (bias) {
    HQ_CHECK(bias->dim() == 1 && bias->size(0) == N, "hfquant::qlinear: bias has shape ", bias->sizes(),
                ", expected [", N, "]");
    HQ_CHECK(bias->is_floating_point(), "hfquant::qlinear: bias must be floating point, got ", bias->scalar_type());
  }
  const c10::cuda::CUDAGuard guard(dev);
  if (bias) b = bias->to(at::kFloat).contiguous();

  auto out_sizes = x.sizes().vec();
  out_sizes.back() = N;
  at::Tensor x2 = x.reshape({-1, K});
  const int64_t M = x2.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0) return y.reshape(out_sizes);

  const bool wide = x.scalar_type() != at::kFloat;
  if (wide && M >= switches::cuda_gemm_min_m()) {
    // Large M: compute bound; dequantize once into x's dtype and let cuBLAS run the GEMM.
    at::Tensor wt = at::empty({N, K}, x.options());
    const int64_t units = Kp / KU, total = N * units;
    const int64_t gs = group_size == -1 ? Kp : group_size;
    dispatch_x(x.scalar_type(), [&](auto* tag) {
      using XT = std::remove_pointer_t<decltype(tag)>;
      auto go = [&](auto kern) {
        kern<<<unsigned(ceil_div(total, 128)), 128, 0, stream()>>>(
            packed_weight.data_ptr<uint8_t>(), ldw, packed_scales.data_ptr<float>(), int(Np), int(P), int(gs),
            int(G), int(N), int(K), int(units), reinterpret_cast<XT*>(wt.data_ptr()));
      };
      if constexpr (std::is_same_v<XT, float>) {
        HQ_CHECK(false, "hfquant::qlinear: float32 activations take the mma kernel");
      } else if (bits == 4) {
        go(dequant_kernel<XT, 4>);
      } else {
        go(dequant_kernel<XT, 8>);
      }
    });
    HFQUANT_CUDA_CHECK_LAUNCH();
    if (bias) {
      at::addmm_out(y, bias->to(x.scalar_type()), x2, wt.t());
    } else {
      at::mm_out(y, x2, wt.t());
    }
    return y.reshape(out_sizes);
  }

  // The kernel reads x rows with 4/8-byte loads of element pairs: unit column stride, an
  // even row stride and K, aligned base; anything else is copied (zero padded) first.
  const int64_t esz = x.element_size();
  const bool ok = x2.stride(1) == 1 && x2.stride(0) % 2 == 0 && K % 2 == 0 &&
                  reinterpret_cast<uintptr_t>(x2.data_ptr()) % (2 * esz) == 0;
  int64_t Ke = K;
  if (!ok) {
    Ke = round_up(K, 2);
    at::Tensor xp = at::zeros({M, Ke}, x.options());
    xp.narrow(1, 0, K).copy_(x2);
    x2 = xp;
  }
  HQ_CHECK(M < (int64_t(1) << 31) / 2, "hfquant::qlinear: too many rows (", M, ")");

  QLinearArgs a{};
  a.x = x2.data_ptr();
  a.ldx = x2.stride(0);
  a.M = int(M);
  a.K = int(Ke);
  a.w = packed_weight.data_ptr<uint8_t>();
  a.ldw = ldw;
  a.ps = packed_scales.data_ptr<float>();
  a.Np = int(Np);
  a.G = int(G);
  a.P = int(P);
  a.gs = int(group_size == -1 ? Kp : group_size);
  a.units = int(Kp / KU);
  a.bias = b.defined() ? b.data_ptr<float>() : nullptr;
  a.y = y.data_ptr();
  a.N = int(N);
  // groups aligned to whole segments take one scale per segment, else one per packed word
  const bool per_word = group_size != -1 && group_size % KU != 0;
  if (M <= std::min<int64_t>(switches::cuda_skinny_max_m(), kSkinnyMaxM)) {
    // Small M: the skinny split-K kernel (one m16 tile per grid.z), if its shared memory fits.
    const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
    const int64_t units = a.units, col_blocks = ceil_div(Np, kSkinnyCols), m_tiles = ceil_div(M, 16);
    int segs = int(switches::cuda_skinny_segs());
    segs = segs > 0 ? int(std::min<int64_t>({segs, kSkinnyMaxSegs, units}))
                    : choose_skinny_segs(col_blocks * m_tiles, units, prop->multiProcessorCount);
    SkinnyArgs sa{};
    sa.q = a;
    sa.segs = segs;
    sa.splits = int(ceil_div(units, segs));
    sa.gmax = int(std::min<int64_t>(G, (int64_t(segs) * KU - 1) / a.gs + 2));
    sa.x_stride = x.scalar_type() == at::kFloat ? int(segs * KU + 8) : int(segs * KU / 2 + 4);
    const size_t smem = skinny_smem_bytes(int(std::min<int64_t>(M, 16)), sa.x_stride, sa.gmax, int(P));
    if (smem <= size_t(prop->sharedMemPerBlockOptin)) {
      at::Tensor ws, counters;
      if (sa.splits > 1) {
        ws = at::empty({sa.splits, M, Np}, x.options().dtype(at::kFloat));
        counters = at::zeros({m_tiles * col_blocks}, x.options().dtype(at::kInt));
        sa.ws = ws.data_ptr<float>();
        sa.counters = counters.data_ptr<int>();
      }
      const dim3 grid(unsigned(col_blocks), unsigned(sa.splits), unsigned(m_tiles));
      dispatch_x(x.scalar_type(), [&](auto* tag) {
        using XT = std::remove_pointer_t<decltype(tag)>;
        auto go = [&](auto bits_c, auto pw_c) {
          constexpr int BITS = decltype(bits_c)::value;
          constexpr bool PW = decltype(pw_c)::value;
          if (smem > 48 * 1024) C10_CUDA_CHECK((allow_skinny_smem<XT, BITS, PW>(int(smem))));
          launch_qlinear_skinny<XT, BITS, PW>(sa, grid, smem, stream());
        };
        auto by_pw = [&](auto bits_c) {
          if (per_word) go(bits_c, std::true_type{});
          else go(bits_c, std::false_type{});
        };
        if (bits == 4) by_pw(std::integral_constant<int, 4>{});
        else by_pw(std::integral_constant<int, 8>{});
      });
      HFQUANT_CUDA_CHECK_LAUNCH();
      return y.reshape(out_sizes);
    }
  }
  // rows per block: 16 * MT
  const int MT = M <= 16 ? 1 : M <= 32 ? 2 : 4;
  const int64_t gy = ceil_div(M, 16 * MT);
  HQ_CHECK(gy <= 65535, "hfquant::qlinear: too many rows (", M, ") for one launch");
  // One 16-channel column per warp group: measured on an H100 at M = 1 and 16 (4096 and
  // 11008 wide layers), the narrowest block was fastest (more blocks, shorter K slices).
  const int wn = 1;
  a.wn = wn;
  const dim3 grid(unsigned(Np / (16 * wn)), unsigned(gy));
  dispatch_x(x.scalar_type(), [&](auto* tag) {
    using XT = std::remove_pointer_t<decltype(tag)>;
    auto go = [&](auto bits_c, auto mt_c) {
      constexpr int BITS = decltype(bits_c)::value, MTc = decltype(mt_c)::value;
      if (per_word) {
        launch_qlinear_mma<XT, BITS, MTc, true>(a, grid, stream());
      } else {
        launch_qlinear_mma<XT, BITS, MTc, false>(a, grid, stream());
      }
    };
    auto by_mt = [&](auto bits_c) {
      if (MT == 1) go(bits_c, std::integral_constant<int, 1>{});
      else if (MT == 2) go(bits_c, std::integral_constant<int, 2>{});
      else go(bits_c, std::integral_constant<int, 4>{});
    };
    if (bits == 4) by_mt(std::integral_constant<int, 4>{});
    else by_mt(std::integral_constant<int, 8>{});
  });
  HFQUANT_CUDA_CHECK_LAUNCH();
  return y.reshape(out_sizes);
}

}  // namespace hfquant::cuda

TORCH_LIBRARY_IMPL(hfquant, CUDA, m) {
  m.impl("repack", &hfquant::cuda::repack_cuda);
  m.impl("qlinear", &hfquant::cuda::qlinear_cuda);
}
