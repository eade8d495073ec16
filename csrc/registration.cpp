// Every schema of the hfquant op namespace, in one place. Implementations register
// per dispatch key at the end of their own files (csrc/cpu/*.cpp, csrc/cuda/*.cu).
#include <torch/library.h>

TORCH_LIBRARY(hfquant, m) {
  // Canonical checkpoint tensors -> the CPU kernel layout (see docs/formats.md,
  // "Kernel layout"). Returns (packed_weight uint8, packed_scales float32). `offsets` (float
  // [N, G], exclusive with zeros): weight = code * scale + offset (format version 2).
  m.def(
      "repack(Tensor qweight, Tensor scales, Tensor? zeros, int bits, int group_size, "
      "int in_features, Tensor? offsets=None) -> (Tensor, Tensor)");
  // y = x @ dequant(W)^T + bias with W in the kernel layout made by repack.
  m.def(
      "qlinear(Tensor x, Tensor packed_weight, Tensor packed_scales, Tensor? bias, int bits, "
      "int group_size, int out_features, int in_features) -> Tensor");
  // The same 4-bit layer with int8 activations: x quantized per row in blocks of 32 (scale
  // max|x| / 127, round half to even), integer dot products with the 4-bit codes (VNNI), i.e.
  // y = x' @ dequant(W)^T + bias for the block-quantized x' (csrc/cpu/qlinear_a8.cpp).
  m.def(
      "qlinear_a8(Tensor x, Tensor packed_weight, Tensor packed_scales, Tensor? bias, int bits, "
      "int group_size, int out_features, int in_features) -> Tensor");
  // Rows `ids` of the weight in that layout, in `dtype`: [..., in_features] (the lookup of a
  // quantized embedding, which may share its tensors with a tied output projection).
  m.def(
      "qembedding(Tensor ids, Tensor packed_weight, Tensor packed_scales, int bits, int group_size, "
      "int out_features, int in_features, ScalarType dtype) -> Tensor");
  // Routed experts (MoE): y[r] = x[r] @ W[e]^T + bias[e] with e = expert_ids[r], from the
  // repack outputs of E experts stacked on a leading dim; each expert's rows exactly as
  // qlinear gives them. x [R, K], expert_ids int64/int32 [R], bias [E, N] -> [R, N].
  m.def(
      "qlinear_routed(Tensor x, Tensor packed_weight, Tensor packed_scales, Tensor expert_ids, Tensor? bias, "
      "int bits, int group_size, int out_features, int in_features) -> Tensor");
  // The same for 4-bit experts with int8 activations: each row as qlinear_a8 computes it (CPU).
  m.def(
      "qlinear_routed_a8(Tensor x, Tensor packed_weight, Tensor packed_scales, Tensor expert_ids, Tensor? bias, "
      "int bits, int group_size, int out_features, int in_features) -> Tensor");

  // --- int8 activations (W8A8, LLM.int8()); layout in csrc/cpu/int8_gemm.h ---
  // int8 weights [N, K] -> (packed int8 [ceil(N/16), ceil(K/4), 16, 4], colsum int32 [N]).
  m.def("int8_pack(Tensor qweight) -> (Tensor, Tensor)");
  // Per-row absmax int8 quantization of x [..., K] (times act_scale when given):
  // (q int8 [..., K], scales float32 [...], outlier_cols int64 [n]). threshold > 0 makes
  // columns with any |x| >= threshold (or NaN/Inf) outliers, zeroed in q; their count is
  // data dependent.
  m.def("quantize_act(Tensor x, float threshold=0., Tensor? act_scale=None) -> (Tensor, Tensor, Tensor)");
  // Exact int32 xq [M, K] @ W^T.
  m.def("int8_mm(Tensor xq, Tensor packed_weight, Tensor colsum, int out_features) -> Tensor");
  // (xq @ W^T) * x_scales[m] * w_scales[n] + bias[n] in out_dtype.
  m.def(
      "int8_gemm(Tensor xq, Tensor x_scales, Tensor packed_weight, Tensor colsum, Tensor w_scales, "
      "Tensor? bias, ScalarType out_dtype, int out_features) -> Tensor");
  // Fused linear layer of W8A8 (threshold 0) and LLM.int8() (threshold > 0).
  m.def(
      "int8_linear(Tensor x, Tensor packed_weight, Tensor colsum, Tensor w_scales, Tensor? bias, "
      "Tensor? act_scale, float threshold, int out_features) -> Tensor");

  // --- quantized KV cache (csrc/cpu/kv_cache.cpp): keys per channel, values per token ---
  // x [..., T, D] -> (codes uint8 [..., T, D*bits/8], scales fp16, mins fp16); params
  // [..., T/g, D] per channel (keys), [..., T, D/g] per token (values).
  m.def("kv_quantize(Tensor x, int bits, int group_size, bool per_channel) -> (Tensor, Tensor, Tensor)");
  // Quantizes x [..., t, D] into preallocated stores at token `offset` (in place).
  m.def(
      "kv_append(Tensor x, Tensor(a!) codes, Tensor(b!) scales, Tensor(c!) mins, int offset, int bits, "
      "int group_size, bool per_channel) -> ()");
  // The first `length` tokens of the stores in `dtype`.
  m.def(
      "kv_dequantize(Tensor codes, Tensor scales, Tensor mins, int length, int bits, int group_size, "
      "bool per_channel, ScalarType dtype) -> Tensor");
  // The same written into the first `length` tokens of `out` (in its dtype).
  m.def(
      "kv_dequantize_into(Tensor codes, Tensor scales, Tensor mins, Tensor(a!) out, int length, int bits, "
      "int group_size, bool per_channel) -> ()");
  // kv_dequantize_into of per-token stores holding rotated states, each token rotated back
  // in the same pass: out = signs * (H y) / sqrt(D) (hadamard_transform(y, signs, inverse=True));
  // D a power of two, signs float32 [D].
  m.def(
      "kv_dequantize_rotated_into(Tensor codes, Tensor scales, Tensor mins, Tensor(a!) out, int length, int bits, "
      "int group_size, Tensor signs) -> ()");

  // --- online rotations (csrc/cpu/hadamard.cpp) ---
  // Fast Walsh-Hadamard transform of each row of the last dimension p (a power of two):
  // forward y = H (signs * x) / sqrt(p), inverse y = signs * (H x) / sqrt(p); signs float32 [p]
  // or None; computed in float32, returned in x's dtype. With mix (float32 [m, m], orthonormal)
  // the last dimension n = m p is m sub-rows of p: forward transforms them, then mixes them
  // (out[i] = sum_j mix[i][j] v[j]); inverse mixes by mix^T, then transforms; signs over n.
  m.def("hadamard_transform(Tensor x, Tensor? signs, bool inverse=False, Tensor? mix=None) -> Tensor");
  // The same in place (the last dimension of x contiguous; leading dimensions may be strided).
  m.def("hadamard_transform_inplace(Tensor(a!) x, Tensor? signs, bool inverse=False, Tensor? mix=None) -> ()");

  // --- fused decoder pieces (csrc/cpu/norm.cpp) ---
  // RMSNorm of the last dimension D: y = weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype), the
  // mean and rsqrt in float32; y in the dtype torch promotes x and weight to; weight [D].
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");

  // --- weight clustering (method "kmeans"; csrc/cpu/lut_linear.cpp, layout in lut_linear.h) ---
  // Checkpoint tensors (qweight uint8 [N, ceil(K*bits/8)] bit-stream indices, codebook
  // [N, G, 2^bits]) -> (packed indices uint8 [N, Kp/2], one nibble per index; packed
  // codebook float32 [N, G, 16]).
  m.def("lut_repack(Tensor qweight, Tensor codebook, int bits, int group_size, int in_features) -> (Tensor, Tensor)");
  // y = x @ W^T + bias, W[n, k] = codebook[n, k / group_size, index(n, k)], from lut_repack's layout.
  m.def(
      "lut_linear(Tensor x, Tensor packed_indices, Tensor packed_codebook, Tensor? bias, int bits, int group_size, "
      "int out_features, int in_features) -> Tensor");
}
