// Every schema of the hfquant op namespace, in one place. Implementations register
// per dispatch key at the end of their own files (csrc/cpu/*.cpp, csrc/cuda/*.cu).
#include <torch/library.h>

TORCH_LIBRARY(hfquant, m) {
  // Canonical checkpoint tensors -> the CPU kernel layout (see docs/formats.md,
  // "Kernel layout"). Returns (packed_weight uint8, packed_scales float32).
  m.def(
      "repack(Tensor qweight, Tensor scales, Tensor? zeros, int bits, int group_size, "
      "int in_features) -> (Tensor, Tensor)");
  // y = x @ dequant(W)^T + bias with W in the kernel layout made by repack.
  m.def(
      "qlinear(Tensor x, Tensor packed_weight, Tensor packed_scales, Tensor? bias, int bits, "
      "int group_size, int out_features, int in_features) -> Tensor");
}
