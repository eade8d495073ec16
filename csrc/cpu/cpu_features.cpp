#include "cpu/cpu_features.h"

#include <atomic>
#include <stdexcept>

#include <c10/util/Exception.h>

#if defined(HFQUANT_X86)
#include <cpuid.h>
#endif

namespace hfquant::cpu {
namespace {

#if defined(HFQUANT_X86)
// The OS must save the wide registers too (XCR0), or the instructions fault.
uint64_t xgetbv0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (uint64_t(edx) << 32) | eax;
}

Features detect() {
  Features f;
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = c & (1u << 27);
  if (!osxsave) return f;
  const uint64_t xcr0 = xgetbv0();
  const bool ymm_os = (xcr0 & 0x6) == 0x6;
  const bool zmm_os = (xcr0 & 0xE6) == 0xE6;
  f.fma = ymm_os && (c & (1u << 12));
  f.f16c = ymm_os && (c & (1u << 29));
  __cpuid_count(7, 0, a, b, c, d);
  f.avx2 = ymm_os && (b & (1u << 5));
  f.avx512f = zmm_os && (b & (1u << 16));
  f.avx512dq = zmm_os && (b & (1u << 17));
  f.avx512bw = zmm_os && (b & (1u << 30));
  f.avx512vl = zmm_os && (b & (1u << 31));
  f.avx512_vnni = zmm_os && (c & (1u << 11));
  unsigned a1, b1, c1, d1;
  __cpuid_count(7, 1, a1, b1, c1, d1);
  f.avx_vnni = ymm_os && (a1 & (1u << 4));
  f.avx512_bf16 = zmm_os && (a1 & (1u << 5));
  return f;
}
#else
Features detect() { return Features{}; }
#endif

bool can_run(Isa isa) {
  const auto& f = features();
  switch (isa) {
    case Isa::Portable: return true;
    case Isa::Avx2: return f.avx2 && f.fma && f.f16c;
    case Isa::Avx512: return can_run(Isa::Avx2) && f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq;
    case Isa::Avx512Bf16: return can_run(Isa::Avx512) && f.avx512_bf16;
  }
  return false;
}

Isa parse(const std::string& name) {
  if (name == "portable") return Isa::Portable;
  if (name == "avx2") return Isa::Avx2;
  if (name == "avx512") return Isa::Avx512;
  if (name == "avx512bf16") return Isa::Avx512Bf16;
  TORCH_CHECK(false, "hfquant: unknown CPU kernel path '", name,
              "' (expected one of auto, avx512bf16, avx512, avx2, portable)");
}

Isa best() {
  for (auto isa : available_isas()) return isa;
  return Isa::Portable;
}

// -1: the best path this CPU can run ("auto"); else a forced Isa (set_active_isa).
std::atomic<int> g_forced{-1};

}  // namespace

const Features& features() {
  static const Features f = detect();
  return f;
}

std::vector<Isa> available_isas() {
  std::vector<Isa> out;
  for (Isa isa : {Isa::Avx512Bf16, Isa::Avx512, Isa::Avx2, Isa::Portable})
    if (can_run(isa)) out.push_back(isa);
  return out;
}

void set_active_isa(const std::string& name) {
  if (name == "auto") {
    g_forced.store(-1);
    return;
  }
  const Isa isa = parse(name);
  TORCH_CHECK(can_run(isa), "hfquant: this CPU cannot run the '", name, "' kernel path");
  g_forced.store(static_cast<int>(isa));
}

std::string isa_setting() {
  const int v = g_forced.load();
  return v < 0 ? std::string("auto") : std::string(isa_name(static_cast<Isa>(v)));
}

Isa active_isa() {
  const int v = g_forced.load(std::memory_order_relaxed);
  if (v >= 0) return static_cast<Isa>(v);
  static const Isa b = best();
  return b;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Portable: return "portable";
    case Isa::Avx2: return "avx2";
    case Isa::Avx512: return "avx512";
    case Isa::Avx512Bf16: return "avx512bf16";
  }
  return "?";
}

}  // namespace hfquant::cpu
