// Run-time CPU feature detection and the choice of kernel path.
#pragma once
#include <string>
#include <vector>

namespace hfquant::cpu {

struct Features {
  bool avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false;
  bool avx512_vnni = false, avx512_bf16 = false, avx_vnni = false;
};

// Kernel paths, best last. Each SIMD path needs the features listed in cpu_features.cpp.
enum class Isa { Portable = 0, Avx2 = 1, Avx512 = 2, Avx512Bf16 = 3 };

const Features& features();
std::vector<Isa> available_isas();  // best first
Isa active_isa();                    // the forced path (set_active_isa), else the best available
void set_active_isa(const std::string& name);  // a path name, or "auto" for the best available
std::string isa_setting();           // "auto" or the forced path's name
const char* isa_name(Isa isa);

}  // namespace hfquant::cpu
