// mend_kernels._C_cuda: pybind11 binding of the CUDA kernels (csrc/cuda, C ABI in mend/kernels.h).
//
// Thin by design: device pointers and the cudaStream_t arrive as Python ints (tensor.data_ptr(),
// torch.cuda.Stream.cuda_stream), sizes are checked (ValueError naming the argument), the GIL is
// released around the launch, and a CUDA error becomes RuntimeError(cudaGetErrorString(...)).
// Compiled by the host C++ compiler; it includes no CUDA header. Importing the module needs neither
// a GPU nor a driver (the CUDA runtime is linked statically); a launch without them raises.

#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "binding_checks.h"
#include "editor_bindings.h"
#include "mend/kernels.h"

namespace py = pybind11;

namespace {

using mend_binding::require_pointer;

// Pointers of this module are CUDA device addresses (tensor.data_ptr() of CUDA tensors).
constexpr const char* kPtr = "device";

void raise_cuda(int status, const char* op) {
  if (status != 0)
    throw std::runtime_error(std::string(op) + ": CUDA error " + std::to_string(status) + ": " +
                             mend_cuda_error_string(status));
}

void rank_update(uintptr_t w_ptr, const std::string& dtype, int64_t M, int64_t N, int64_t ldw,
                 uintptr_t a_ptr, uintptr_t b_ptr, int64_t K, float scale, uintptr_t stream) {
  const int code = mend_binding::dtype_code(dtype);
  mend_binding::check_rank_update(kPtr, w_ptr, a_ptr, b_ptr, M, N, ldw, K);
  int status;
  {
    py::gil_scoped_release release;
    status = mend_cuda_rank_update(reinterpret_cast<void*>(w_ptr), code, M, N, ldw,
                                   reinterpret_cast<const float*>(a_ptr), reinterpret_cast<const float*>(b_ptr),
                                   K, scale, stream);
  }
  raise_cuda(status, "rank_update");
}

void rank_update_batched(const py::list& descriptors, uintptr_t stream) {
  const auto descs = mend_binding::rank_update_descriptors(kPtr, descriptors);
  int status;
  {
    py::gil_scoped_release release;
    status = mend_cuda_rank_update_batched(descs.data(), static_cast<int64_t>(descs.size()), stream);
  }
  raise_cuda(status, "rank_update_batched");
}

void running_moments(uintptr_t mean_ptr, uintptr_t m2_ptr, uintptr_t count_ptr, uintptr_t x_ptr, int64_t n,
                     int64_t d, int64_t ldx, uintptr_t stream) {
  require_pointer(mean_ptr, "mean_ptr", kPtr);
  require_pointer(m2_ptr, "m2_ptr", kPtr);
  require_pointer(count_ptr, "count_ptr", kPtr, " (int64 scalar)");
  require_pointer(x_ptr, "x_ptr", kPtr);
  mend_binding::check_moments_sizes(n, d, ldx);
  int status;
  {
    py::gil_scoped_release release;
    status = mend_cuda_running_moments(reinterpret_cast<float*>(mean_ptr), reinterpret_cast<float*>(m2_ptr),
                                       reinterpret_cast<const int64_t*>(count_ptr),
                                       reinterpret_cast<const float*>(x_ptr), n, d, ldx, stream);
  }
  raise_cuda(status, "running_moments");
}

// The editor's element-wise passes (mend_cuda_editor_*): checks and calls shared in editor_bindings.h.
void editor_normalize(uintptr_t z_ptr, uintptr_t rows_ptr, int64_t ldr, uintptr_t mean_ptr, uintptr_t std_ptr,
                      float eps, int64_t n, int64_t d, uintptr_t stream) {
  raise_cuda(mend_binding::editor_normalize(mend_cuda_editor_normalize, kPtr, z_ptr, rows_ptr, ldr, mean_ptr, std_ptr,
                                             eps, n, d, stream),
             "editor_normalize");
}

void editor_layer_forward(uintptr_t out_ptr, uintptr_t pre_ptr, uintptr_t res_ptr, uintptr_t scale_ptr,
                          uintptr_t shift_ptr, int64_t n, int64_t d, uintptr_t stream) {
  raise_cuda(mend_binding::editor_layer_forward(mend_cuda_editor_layer_forward, kPtr, out_ptr, pre_ptr, res_ptr,
                                                 scale_ptr, shift_ptr, n, d, stream),
             "editor_layer_forward");
}

void editor_layer_backward(uintptr_t ga_ptr, uintptr_t g_ptr, uintptr_t pre_ptr, uintptr_t scale_ptr,
                           uintptr_t shift_ptr, uintptr_t dbias_ptr, uintptr_t dscale_ptr, uintptr_t dshift_ptr,
                           int64_t n, int64_t d, uintptr_t stream) {
  raise_cuda(mend_binding::editor_layer_backward(mend_cuda_editor_layer_backward, kPtr, ga_ptr, g_ptr, pre_ptr,
                                                  scale_ptr, shift_ptr, dbias_ptr, dscale_ptr, dshift_ptr, n, d, stream),
             "editor_layer_backward");
}

#ifndef MEND_CUDA_RUNTIME_LINKAGE
#define MEND_CUDA_RUNTIME_LINKAGE "unknown"
#endif
#ifndef MEND_BUILD_TYPE
#define MEND_BUILD_TYPE "unknown"
#endif

py::dict build_info() {
  py::dict d;
  d["nvcc_version"] = mend_cuda_nvcc_version();
  int archs[64];
  const int count = mend_cuda_architectures(archs, 64);
  py::list arch_list;
  for (int i = 0; i < count && i < 64; ++i) arch_list.append(archs[i]);
  d["architectures"] = arch_list;
  d["cuda_runtime"] = MEND_CUDA_RUNTIME_LINKAGE;
  d["build_type"] = MEND_BUILD_TYPE;
  return d;
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "mend_kernels CUDA kernels on raw device pointers; see csrc/include/mend/kernels.h";
  m.def("rank_update", &rank_update, py::arg("w_ptr"), py::arg("dtype"), py::arg("M"), py::arg("N"),
        py::arg("ldw"), py::arg("a_ptr"), py::arg("b_ptr"), py::arg("K"), py::arg("scale"), py::arg("stream"),
        "In place on the GPU, enqueued on `stream` (cudaStream_t as int): W[m, n] = round(W[m, n] + scale * "
        "sum_k A[k, m] * B[k, n]), fp32 accumulation, one rounding to W's dtype.");
  m.def("rank_update_batched", &rank_update_batched, py::arg("descriptors"), py::arg("stream"),
        "rank_update on several weights in one kernel launch, enqueued on `stream`: descriptors is a non-empty "
        "list of tuples (w_ptr, dtype, M, N, ldw, a_ptr, b_ptr, K, scale) of device pointers; the weights must "
        "not overlap.");
  m.def("running_moments", &running_moments, py::arg("mean_ptr"), py::arg("m2_ptr"), py::arg("count_ptr"),
        py::arg("x_ptr"), py::arg("n"), py::arg("d"), py::arg("ldx"), py::arg("stream"),
        "In place on the GPU: merge x (n, d; row stride ldx) into mean/M2; count_ptr points to the int64 "
        "number of rows already merged (not modified).");
  m.def("editor_normalize", &editor_normalize, py::arg("z_ptr"), py::arg("rows_ptr"), py::arg("ldr"),
        py::arg("mean_ptr"), py::arg("std_ptr"), py::arg("eps"), py::arg("n"), py::arg("d"), py::arg("stream"),
        mend_binding::kEditorNormalizeDoc);
  m.def("editor_layer_forward", &editor_layer_forward, py::arg("out_ptr"), py::arg("pre_ptr"), py::arg("res_ptr"),
        py::arg("scale_ptr"), py::arg("shift_ptr"), py::arg("n"), py::arg("d"), py::arg("stream"),
        mend_binding::kEditorLayerForwardDoc);
  m.def("editor_layer_backward", &editor_layer_backward, py::arg("ga_ptr"), py::arg("g_ptr"), py::arg("pre_ptr"),
        py::arg("scale_ptr"), py::arg("shift_ptr"), py::arg("dbias_ptr"), py::arg("dscale_ptr"),
        py::arg("dshift_ptr"), py::arg("n"), py::arg("d"), py::arg("stream"),
        mend_binding::kEditorLayerBackwardDoc);
  m.def("build_info", &build_info, "dict: nvcc_version, architectures (list of compute capabilities, e.g. [80, 90]), cuda_runtime, build_type.");
}
