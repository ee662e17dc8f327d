// mend_kernels._C: pybind11 binding of the CPU kernels (csrc/cpu, C ABI in mend/kernels.h).
//
// Thin by design: pointers arrive as Python ints (torch's tensor.data_ptr()), sizes are checked
// (ValueError naming the argument), the GIL is released around the kernel, and a non-zero status
// becomes an exception. No kernel logic lives here.

#include <pybind11/pybind11.h>

#include <cstdint>
#include <new>
#include <string>

#include "binding_checks.h"
#include "editor_bindings.h"
#include "mend/kernels.h"

namespace py = pybind11;

namespace {

using mend_binding::require;
using mend_binding::require_pointer;

// Pointers of this module are host addresses (tensor.data_ptr() of CPU tensors).
constexpr const char* kPtr = "data";

void raise_status(int status, const char* op) {
  if (status == MEND_OK) return;
  if (status == MEND_ERR_OUT_OF_MEMORY)
    throw std::bad_alloc();  // pybind11 translates it to MemoryError
  throw py::value_error(std::string(op) + ": the kernel rejected its arguments (status " +
                        std::to_string(status) + ")");
}

void rank_update(uintptr_t w_ptr, const std::string& dtype, int64_t M, int64_t N, int64_t ldw,
                 uintptr_t a_ptr, uintptr_t b_ptr, int64_t K, float scale) {
  const int code = mend_binding::dtype_code(dtype);
  mend_binding::check_rank_update(kPtr, w_ptr, a_ptr, b_ptr, M, N, ldw, K);
  int status;
  {
    py::gil_scoped_release release;
    status = mend_cpu_rank_update(reinterpret_cast<void*>(w_ptr), code, M, N, ldw,
                                  reinterpret_cast<const float*>(a_ptr),
                                  reinterpret_cast<const float*>(b_ptr), K, scale);
  }
  raise_status(status, "rank_update");
}

void rank_update_batched(const py::list& descriptors) {
  const auto descs = mend_binding::rank_update_descriptors(kPtr, descriptors);
  int status;
  {
    py::gil_scoped_release release;
    status = mend_cpu_rank_update_batched(descs.data(), static_cast<int64_t>(descs.size()));
  }
  raise_status(status, "rank_update_batched");
}

void running_moments(uintptr_t mean_ptr, uintptr_t m2_ptr, int64_t count, uintptr_t x_ptr, int64_t n,
                     int64_t d, int64_t ldx) {
  require_pointer(mean_ptr, "mean_ptr", kPtr);
  require_pointer(m2_ptr, "m2_ptr", kPtr);
  require_pointer(x_ptr, "x_ptr", kPtr);
  require(count >= 0, "count (rows already merged) must be >= 0");
  mend_binding::check_moments_sizes(n, d, ldx);
  int status;
  {
    py::gil_scoped_release release;
    status = mend_cpu_running_moments(reinterpret_cast<float*>(mean_ptr), reinterpret_cast<float*>(m2_ptr),
                                      count, reinterpret_cast<const float*>(x_ptr), n, d, ldx);
  }
  raise_status(status, "running_moments");
}

// The editor's element-wise passes (mend_cpu_editor_*): checks and calls shared in editor_bindings.h.
void editor_normalize(uintptr_t z_ptr, uintptr_t rows_ptr, int64_t ldr, uintptr_t mean_ptr, uintptr_t std_ptr,
                      float eps, int64_t n, int64_t d) {
  raise_status(mend_binding::editor_normalize(mend_cpu_editor_normalize, kPtr, z_ptr, rows_ptr, ldr, mean_ptr, std_ptr,
                                             eps, n, d),
             "editor_normalize");
}

void editor_layer_forward(uintptr_t out_ptr, uintptr_t pre_ptr, uintptr_t res_ptr, uintptr_t scale_ptr,
                          uintptr_t shift_ptr, int64_t n, int64_t d) {
  raise_status(mend_binding::editor_layer_forward(mend_cpu_editor_layer_forward, kPtr, out_ptr, pre_ptr, res_ptr,
                                                 scale_ptr, shift_ptr, n, d),
             "editor_layer_forward");
}

void editor_layer_backward(uintptr_t ga_ptr, uintptr_t g_ptr, uintptr_t pre_ptr, uintptr_t scale_ptr,
                           uintptr_t shift_ptr, uintptr_t dbias_ptr, uintptr_t dscale_ptr, uintptr_t dshift_ptr,
                           int64_t n, int64_t d) {
  raise_status(mend_binding::editor_layer_backward(mend_cpu_editor_layer_backward, kPtr, ga_ptr, g_ptr, pre_ptr,
                                                  scale_ptr, shift_ptr, dbias_ptr, dscale_ptr, dshift_ptr, n, d),
             "editor_layer_backward");
}

py::dict build_info() {
  mend_cpu_build_facts f;
  mend_cpu_get_build_facts(&f);
  py::dict d;
  d["compiler"] = f.compiler;
  d["build_type"] = f.build_type;
  d["cxx_flags"] = f.cxx_flags;
  d["openmp"] = static_cast<bool>(f.openmp);
  d["openmp_version"] = f.openmp_version;
  d["max_threads"] = f.max_threads;
  d["simd_variants"] = f.simd_variants;
  d["simd_path"] = mend_cpu_simd_path();
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "mend_kernels CPU kernels (C++/OpenMP) on raw pointers; see csrc/include/mend/kernels.h";
  m.def("rank_update", &rank_update, py::arg("w_ptr"), py::arg("dtype"), py::arg("M"), py::arg("N"),
        py::arg("ldw"), py::arg("a_ptr"), py::arg("b_ptr"), py::arg("K"), py::arg("scale"),
        "In place: W[m, n] = round(W[m, n] + scale * sum_k A[k, m] * B[k, n]), fp32 accumulation, one "
        "rounding to W's dtype ('float32', 'bfloat16' or 'float16'). W (M, N) row stride ldw; A (K, M) and "
        "B (K, N) contiguous float32. Pointers are data_ptr() integers of CPU tensors.");
  m.def("rank_update_batched", &rank_update_batched, py::arg("descriptors"),
        "rank_update on several weights in one call (one OpenMP parallel region for all their tiles): "
        "descriptors is a non-empty list of tuples (w_ptr, dtype, M, N, ldw, a_ptr, b_ptr, K, scale) with "
        "rank_update's meanings; the weights must not overlap. Every tuple is checked before any weight changes.");
  m.def("running_moments", &running_moments, py::arg("mean_ptr"), py::arg("m2_ptr"), py::arg("count"),
        py::arg("x_ptr"), py::arg("n"), py::arg("d"), py::arg("ldx"),
        "In place: merge the batch x (n, d; row stride ldx; float32) into the running float32 mean (d) and "
        "M2 (d) of `count` rows (Chan et al.; two-pass float64 batch statistics). The caller adds n to "
        "its count.");
  m.def("editor_normalize", &editor_normalize, py::arg("z_ptr"), py::arg("rows_ptr"), py::arg("ldr"),
        py::arg("mean_ptr"), py::arg("std_ptr"), py::arg("eps"), py::arg("n"), py::arg("d"),
        mend_binding::kEditorNormalizeDoc);
  m.def("editor_layer_forward", &editor_layer_forward, py::arg("out_ptr"), py::arg("pre_ptr"), py::arg("res_ptr"),
        py::arg("scale_ptr"), py::arg("shift_ptr"), py::arg("n"), py::arg("d"),
        mend_binding::kEditorLayerForwardDoc);
  m.def("editor_layer_backward", &editor_layer_backward, py::arg("ga_ptr"), py::arg("g_ptr"), py::arg("pre_ptr"),
        py::arg("scale_ptr"), py::arg("shift_ptr"), py::arg("dbias_ptr"), py::arg("dscale_ptr"),
        py::arg("dshift_ptr"), py::arg("n"), py::arg("d"),
        mend_binding::kEditorLayerBackwardDoc);
  m.def("build_info", &build_info,
        "dict: compiler, build_type, cxx_flags, openmp, openmp_version, max_threads, simd_variants, "
        "simd_path (the path taken on this CPU).");
}
