// The int8 x int8 -> int32 GEMM of W8A8 and LLM.int8(): weight layout, views and the
// per-path kernel entry points. docs/formats.md ("int8 GEMM layout") describes the layout.
//
// Weights (from hfquant::int8_pack): int8 [Nt][K4][16][4], Nt = ceil(N/16), K4 = ceil(K/4):
// for a tile of 16 output channels, 4 consecutive k of each channel form one 32-bit lane
// and 16 channels one 64-byte row, the operand of one vpdpbusd. Padding is zero.
// Activations are quantized into rows of K4*4 bytes, zero padded, stored either as int8
// (AVX2 and portable paths) or as uint8 x + 128 (VNNI: vpdpbusd multiplies unsigned by
// signed bytes); the VNNI path subtracts 128 * colsum[n] afterwards, exactly.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "cpu/qlinear.h"  // DType

namespace hfquant::cpu::i8 {

constexpr int64_t kTile = 16;  // output channels per tile
constexpr int64_t kKG = 4;     // k per 32-bit lane

enum class Path : int8_t { Portable = 0, Avx2 = 1, AvxVnni = 2, Vnni512 = 3 };

struct WeightView {
  const int8_t* w;
  const int32_t* colsum;  // sum_k w[n][k], [N]
  int64_t N, K, K4, Nt;
};

struct ActView {
  const uint8_t* x;  // [M][K4*4]: int8, or uint8 x + 128 for the VNNI path
  int64_t ld;        // bytes per row
  int64_t M;
};

// What the kernel stores for y[m][n]: the exact int32 dot product, or
// float(dot) * (xs[m] * ws[n]) (+ add[m][n]) (+ sum_i xo[m][i] * wo[i][n]) (+ bias[n])
// converted to dt, in that order. A NaN xs[m] makes the row NaN. add / xo, wo carry
// LLM.int8's outlier product: precomputed (many outliers) or fused here (few).
struct Epilogue {
  void* y;
  bool int32_out;
  DType dt;          // when !int32_out
  int64_t ldy;       // elements per row of y
  const float* xs;   // [M] per-row (per-token) scales
  const float* ws;   // [N] per-channel weight scales
  const float* bias; // [N] or nullptr
  const float* add = nullptr;  // [M][ldy] float32 addend or nullptr
  const float* xo = nullptr;   // [M][n_out] outlier columns of x
  const float* wo = nullptr;   // [n_out][ldy] matching weight columns, dequantized, transposed
  int64_t n_out = 0;
};

// Computes rows [m0, m1) x tiles [t0, t1) of y.
using GemmFn = void (*)(const ActView& a, const WeightView& w, const Epilogue& e, int64_t m0, int64_t m1,
                        int64_t t0, int64_t t1);
void gemm_portable(const ActView&, const WeightView&, const Epilogue&, int64_t, int64_t, int64_t, int64_t);
void gemm_avx2(const ActView&, const WeightView&, const Epilogue&, int64_t, int64_t, int64_t, int64_t);
void gemm_avxvnni(const ActView&, const WeightView&, const Epilogue&, int64_t, int64_t, int64_t, int64_t);
void gemm_vnni512(const ActView&, const WeightView&, const Epilogue&, int64_t, int64_t, int64_t, int64_t);

// Activations as unsigned bytes x + 128 (the VNNI paths) rather than int8.
inline bool offset_activations(Path p) { return p == Path::Vnni512 || p == Path::AvxVnni; }

// Row kernels of the activation quantization (float32 rows, K elements):
//   flag   : mask[k] |= !(|v[k]| < threshold)        (NaN and Inf are flagged)
//   absmax : max |v[k]| over k with !mask[k] (mask may be null); NaN when one of those
//            values is NaN or Inf
//   quant  : q[k] = clamp(round_half_even(v[k] * inv), -127, 127) + offset, 0 + offset
//            where mask[k]
struct RowFns {
  void (*flag)(const float* v, int64_t K, float threshold, uint8_t* mask);
  float (*absmax)(const float* v, int64_t K, const uint8_t* mask);
  void (*quant)(const float* v, int64_t K, const uint8_t* mask, float inv, uint8_t* q, uint8_t offset);
};
extern const RowFns kRowsPortable, kRowsAvx2, kRowsAvx512;

}  // namespace hfquant::cpu::i8

namespace hfquant::cpu {
i8::Path active_int8_path();    // kernel path of the int8 GEMM under the active ISA (or forced)
const char* int8_path_name();  // its name
// Forces an int8 kernel path ("auto" restores the choice from the active ISA); raises if
// this CPU cannot run it.
void set_int8_path(const std::string& name);
std::string int8_path_setting();  // "auto" or the forced path's name
std::vector<std::string> available_int8_paths();  // best first
}
