// The pybind11 half of hfquant._C: build facts, the getters and setters of the kernel
// switches (hfquant.settings in hfquant/runtime.py calls them), and one direct entry to the
// CPU qlinear kernel for eager inference (hfquant/ops.py). Ops live in torch.ops.hfquant.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/python.h>

#include "cpu/cpu_features.h"
#include "cpu/int8_gemm.h"
#include "switches.h"

#ifndef HFQUANT_VERSION
#define HFQUANT_VERSION "0.0.0"
#endif

namespace py = pybind11;

namespace {
// A setter whose argument check fails raises RuntimeError with the check's message only.
template <class T>
auto checked(void (*set)(T)) {
  return [set](T v) {
    try {
      set(v);
    } catch (const c10::Error& e) {
      throw std::runtime_error(e.what_without_backtrace());
    }
  };
}
}  // namespace

namespace hfquant::cpu {
// csrc/cpu/qlinear.cpp, the CPU kernel of torch.ops.hfquant.qlinear
at::Tensor qlinear_cpu(const at::Tensor& x, const at::Tensor& packed_weight, const at::Tensor& packed_scales,
                       const std::optional<at::Tensor>& bias, int64_t bits, int64_t group_size,
                       int64_t out_features, int64_t in_features);
// csrc/cpu/qlinear_routed.cpp, the CPU kernel of torch.ops.hfquant.qlinear_routed
at::Tensor qlinear_routed_cpu(const at::Tensor& x, const at::Tensor& packed_weight, const at::Tensor& packed_scales,
                              const at::Tensor& expert_ids, const std::optional<at::Tensor>& bias, int64_t bits,
                              int64_t group_size, int64_t out_features, int64_t in_features);
}  // namespace hfquant::cpu

PYBIND11_MODULE(_C, m) {
  m.doc() = "hfquant native core (ops are registered under torch.ops.hfquant)";
  m.attr("__version__") = HFQUANT_VERSION;
#ifdef HFQUANT_CUDA
  m.attr("cuda_built") = true;
#else
  m.attr("cuda_built") = false;
#endif
  // The kernel switches (csrc/switches.h); hfquant.settings is the public interface to them.
  namespace sw = hfquant::switches;
  m.def("gemv_max_m", &sw::gemv_max_m, "CPU qlinear/lut_linear: largest M of the GEMV kernels (-1: per path).");
  m.def("set_gemv_max_m", checked(&sw::set_gemv_max_m), "Sets it (-1 or at least 0).");
  m.def("gemm_min_m", &sw::gemm_min_m, "CPU qlinear: smallest M of the register-blocked Gemm path (-1: per path).");
  m.def("set_gemm_min_m", checked(&sw::set_gemm_min_m), "Sets it (-1 or at least 1).");
  m.def("block_rows", &sw::block_rows, "CPU qlinear: weight rows per GEMM call on the blocked path (-1: ~16 MiB).");
  m.def("set_block_rows", checked(&sw::set_block_rows), "Sets it (-1 or at least 1).");
  m.def("qgemm", &sw::qgemm, "CPU qlinear: whether the register-blocked Gemm path may serve large M.");
  m.def("set_qgemm", checked(&sw::set_qgemm), "Sets it.");
  m.def("cuda_gemm_min_m", &sw::cuda_gemm_min_m,
        "Smallest M at which bf16/fp16 qlinear on CUDA dequantizes the weight and calls cuBLAS instead of "
        "the mma.sync kernel.");
  m.def("set_cuda_gemm_min_m", checked(&sw::set_cuda_gemm_min_m), "Sets that threshold (at least 0).");
  m.def("cuda_skinny_max_m", &sw::cuda_skinny_max_m,
        "Largest M at which qlinear on CUDA takes the skinny split-K kernel (0: off).");
  m.def("set_cuda_skinny_max_m", checked(&sw::set_cuda_skinny_max_m), "Sets that threshold (0..64).");
  m.def("cuda_skinny_segs", &sw::cuda_skinny_segs, "Segments per block of the skinny kernel (0: chosen per layer).");
  m.def("set_cuda_skinny_segs", checked(&sw::set_cuda_skinny_segs),
        "Forces the segments per block (1..8; 0 chooses again).");
  m.def("cuda_int8_lt", &sw::cuda_int8_lt,
        "Whether the CUDA int8 GEMM calls cuBLASLt with its heuristic algorithm and a workspace (else "
        "at::_int_mm, the default until measured).");
  m.def("set_cuda_int8_lt", checked(&sw::set_cuda_int8_lt), "Chooses between the two.");
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
        "The kernel path in use on this CPU (avx512bf16, avx512, avx2, portable).");
  m.def("set_cpu_isa", checked<const std::string&>(&hfquant::cpu::set_active_isa),
        "Force a kernel path, or 'auto' for the best this CPU runs; raises if this CPU cannot run it.");
  m.def("cpu_isa_setting", &hfquant::cpu::isa_setting, "'auto' or the forced kernel path.");
  m.def("int8_path", []() { return std::string(hfquant::cpu::int8_path_name()); },
        "The int8 GEMM kernel in use: avx512vnni, avxvnni, avx2 or portable (from the active kernel path "
        "unless forced).");
  m.def("set_int8_path", checked<const std::string&>(&hfquant::cpu::set_int8_path),
        "Force an int8 GEMM kernel; 'auto' follows the active kernel path.");
  m.def("int8_path_setting", &hfquant::cpu::int8_path_setting, "'auto' or the forced int8 GEMM kernel.");
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
  // The same for hfquant::qlinear_routed (hfquant.ops.qlinear_routed, same conditions).
  m.def("qlinear_routed_cpu",
        [](const at::Tensor& x, const at::Tensor& packed_weight, const at::Tensor& packed_scales,
           const at::Tensor& expert_ids, const std::optional<at::Tensor>& bias, int64_t bits, int64_t group_size,
           int64_t out_features, int64_t in_features) {
          try {
            return hfquant::cpu::qlinear_routed_cpu(x, packed_weight, packed_scales, expert_ids, bias, bits,
                                                    group_size, out_features, in_features);
          } catch (const c10::Error& e) {
            throw std::runtime_error(e.what_without_backtrace());
          }
        },
        py::arg("x"), py::arg("packed_weight"), py::arg("packed_scales"), py::arg("expert_ids"), py::arg("bias"),
        py::arg("bits"), py::arg("group_size"), py::arg("out_features"), py::arg("in_features"),
        py::call_guard<py::gil_scoped_release>(),
        "hfquant::qlinear_routed's CPU kernel called directly (eager inference fast path).");
  m.def("available_isas", []() {
    std::vector<std::string> out;
    for (auto isa : hfquant::cpu::available_isas()) out.emplace_back(hfquant::cpu::isa_name(isa));
    return out;
  }, "Kernel paths this CPU can run, best first.");
}
