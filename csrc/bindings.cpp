// The pybind11 half of hfquant._C: build facts, and one direct entry to the CPU qlinear
// kernel for eager inference (hfquant/ops.py). Ops live in torch.ops.hfquant.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/python.h>

#include "cpu/cpu_features.h"
#include "cpu/int8_gemm.h"
#ifdef HFQUANT_CUDA
#include "cuda/gemm_switch.h"
#endif

#ifndef HFQUANT_VERSION
#define HFQUANT_VERSION "0.0.0"
#endif

namespace py = pybind11;

namespace hfquant::cpu {
// csrc/cpu/qlinear.cpp, the CPU kernel of torch.ops.hfquant.qlinear
at::Tensor qlinear_cpu(const at::Tensor& x, const at::Tensor& packed_weight, const at::Tensor& packed_scales,
                       const std::optional<at::Tensor>& bias, int64_t bits, int64_t group_size,
                       int64_t out_features, int64_t in_features);
}  // namespace hfquant::cpu

PYBIND11_MODULE(_C, m) {
  m.doc() = "hfquant native core (ops are registered under torch.ops.hfquant)";
  m.attr("__version__") = HFQUANT_VERSION;
#ifdef HFQUANT_CUDA
  m.attr("cuda_built") = true;
  m.def("cuda_gemm_min_m", []() { return hfquant::cuda::gemm_min_m(); },
        "Smallest M at which bf16/fp16 qlinear on CUDA dequantizes the weight and calls cuBLAS instead of "
        "the mma.sync kernel (HFQUANT_CUDA_GEMM_MIN_M overrides).");
  m.def("set_cuda_gemm_min_m", [](int64_t v) { hfquant::cuda::set_gemm_min_m(v); },
        "Sets that threshold (for tests and benchmarks).");
  m.def("cuda_skinny_max_m", []() { return hfquant::cuda::skinny_max_m(); },
        "Largest M at which qlinear on CUDA takes the skinny split-K kernel (0: off; "
        "HFQUANT_CUDA_SKINNY_MAX_M overrides).");
  m.def("set_cuda_skinny_max_m", [](int64_t v) { hfquant::cuda::set_skinny_max_m(v); },
        "Sets that threshold (for tests and benchmarks; at most 64 takes effect).");
  m.def("cuda_skinny_segs", []() { return hfquant::cuda::skinny_segs(); },
        "Segments per block of the skinny kernel (0: chosen per layer; HFQUANT_CUDA_SKINNY_SEGS overrides).");
  m.def("set_cuda_skinny_segs", [](int64_t v) { hfquant::cuda::set_skinny_segs(v); },
        "Forces the segments per block (1..8; 0 chooses again), for tests and benchmark sweeps.");
  m.def("cuda_int8_lt", []() { return hfquant::cuda::int8_lt(); },
        "Whether the CUDA int8 GEMM calls cuBLASLt with its heuristic algorithm and a workspace (else "
        "at::_int_mm, the default until measured; HFQUANT_CUDA_INT8_LT=1 turns it on).");
  m.def("set_cuda_int8_lt", [](bool on) { hfquant::cuda::set_int8_lt(on); },
        "Chooses between the two (for tests and benchmarks).");
#else
  m.attr("cuda_built") = false;
#endif
  m.def("cpu_features", []() {
    const auto& f = hfquant::cpu::features();
    py::dict d;
    d["avx2"] = f.avx2;
    d["fma"] = f.fma;
    d["f16c"] = f.f16c;
    d["avx512f"] = f.avx512f;
    d["avx512bw"] = f.avx512bw;
    d["avx512vl"] = f.avx512vl;
    d["avx512dq"] = f.avx512dq;
    d["avx512_vnni"] = f.avx512_vnni;
    d["avx512_bf16"] = f.avx512_bf16;
    d["avx_vnni"] = f.avx_vnni;
    return d;
  }, "CPU features detected at run time.");
  m.def("cpu_isa", []() { return std::string(hfquant::cpu::isa_name(hfquant::cpu::active_isa())); },
        "The kernel path chosen on this CPU (HFQUANT_ISA overrides: avx512bf16, avx512, avx2, portable).");
  m.def("set_cpu_isa", [](const std::string& name) { hfquant::cpu::set_active_isa(name); },
        "Force a kernel path (for tests and benchmarks); raises if this CPU cannot run it.");
  m.def("int8_path", []() { return std::string(hfquant::cpu::int8_path_name()); },
        "The int8 GEMM kernel in use: avx512vnni, avxvnni, avx2 or portable (from the active kernel path "
        "unless forced).");
  m.def("set_int8_path", [](const std::string& name) { hfquant::cpu::set_int8_path(name); },
        "Force an int8 GEMM kernel (for tests and benchmarks); 'auto' follows the active kernel path.");
  m.def("available_int8_paths", []() { return hfquant::cpu::available_int8_paths(); },
        "int8 GEMM kernels this CPU can run, best first.");
  // The same function the dispatcher calls for CPU tensors, without the dispatcher: no
  // autograd, no tensor subclasses, no tracing. hfquant.ops.qlinear uses it only for plain
  // CPU tensors when no gradient is wanted and nothing is being compiled; there the
  // dispatcher's boxed call through the op's Python autograd kernel cost ~4 us per call
  // (a decode step of the default model makes 211 of them).
  m.def("qlinear_cpu",
        [](const at::Tensor& x, const at::Tensor& packed_weight, const at::Tensor& packed_scales,
           const std::optional<at::Tensor>& bias, int64_t bits, int64_t group_size, int64_t out_features,
           int64_t in_features) {
          try {
            return hfquant::cpu::qlinear_cpu(x, packed_weight, packed_scales, bias, bits, group_size,
                                             out_features, in_features);
          } catch (const c10::Error& e) {
            // the message the dispatcher route raises, without the C++ backtrace
            throw std::runtime_error(e.what_without_backtrace());
          }
        },
        py::arg("x"), py::arg("packed_weight"),
        py::arg("packed_scales"), py::arg("bias"), py::arg("bits"), py::arg("group_size"),
        py::arg("out_features"), py::arg("in_features"), py::call_guard<py::gil_scoped_release>(),
        "hfquant::qlinear's CPU kernel called directly (eager inference fast path).");
  m.def("available_isas", []() {
    std::vector<std::string> out;
    for (auto isa : hfquant::cpu::available_isas()) out.emplace_back(hfquant::cpu::isa_name(isa));
    return out;
  }, "Kernel paths this CPU can run, best first.");
}
