// The bindings of the editor's element-wise kernels (mend_cpu_editor_* / mend_cuda_editor_*),
// shared by mend_kernels._C (bindings.cpp) and mend_kernels._C_cuda (bindings_cuda.cpp): the same
// argument checks, casts and docstrings. Each module passes its C entry point, the kind of pointer
// it expects ("data" or "device") and the launch arguments it appends (none on the CPU, the CUDA
// stream). The GIL is released around the kernel; each function returns the kernel's status.
#ifndef MEND_EDITOR_BINDINGS_H_
#define MEND_EDITOR_BINDINGS_H_

#include <pybind11/pybind11.h>

#include <cstdint>

#include "binding_checks.h"

namespace mend_binding {

constexpr const char* kEditorNormalizeDoc =
    "z = (rows - mean) / (std + eps); rows (n, d) with row stride ldr, z contiguous; float32.";
constexpr const char* kEditorLayerForwardDoc =
    "out = res + clamp(pre * scale + shift, min=0); (n, d) contiguous float32, scale/shift (d,).";
constexpr const char* kEditorLayerBackwardDoc =
    "ga = g * [pre * scale + shift >= 0] * scale and the column sums dshift, dscale, dbias (deterministic).";

inline const float* in(uintptr_t ptr) { return reinterpret_cast<const float*>(ptr); }
inline float* out(uintptr_t ptr) { return reinterpret_cast<float*>(ptr); }

template <typename Kernel, typename... Launch>
int editor_normalize(Kernel kernel, const char* kind, uintptr_t z_ptr, uintptr_t rows_ptr, int64_t ldr,
                     uintptr_t mean_ptr, uintptr_t std_ptr, float eps, int64_t n, int64_t d, Launch... launch) {
  check_pointers(kind, {{z_ptr, "z_ptr"}, {rows_ptr, "rows_ptr"}, {mean_ptr, "mean_ptr"}, {std_ptr, "std_ptr"}});
  check_editor_sizes(n, d);
  require(ldr >= d, "ldr (row stride of rows, in elements) must be >= d");
  pybind11::gil_scoped_release release;
  return kernel(out(z_ptr), in(rows_ptr), ldr, in(mean_ptr), in(std_ptr), eps, n, d, launch...);
}

template <typename Kernel, typename... Launch>
int editor_layer_forward(Kernel kernel, const char* kind, uintptr_t out_ptr, uintptr_t pre_ptr, uintptr_t res_ptr,
                         uintptr_t scale_ptr, uintptr_t shift_ptr, int64_t n, int64_t d, Launch... launch) {
  check_pointers(kind, {{out_ptr, "out_ptr"}, {pre_ptr, "pre_ptr"}, {res_ptr, "res_ptr"}, {scale_ptr, "scale_ptr"},
                        {shift_ptr, "shift_ptr"}});
  check_editor_sizes(n, d);
  pybind11::gil_scoped_release release;
  return kernel(out(out_ptr), in(pre_ptr), in(res_ptr), in(scale_ptr), in(shift_ptr), n, d, launch...);
}

template <typename Kernel, typename... Launch>
int editor_layer_backward(Kernel kernel, const char* kind, uintptr_t ga_ptr, uintptr_t g_ptr, uintptr_t pre_ptr,
                          uintptr_t scale_ptr, uintptr_t shift_ptr, uintptr_t dbias_ptr, uintptr_t dscale_ptr,
                          uintptr_t dshift_ptr, int64_t n, int64_t d, Launch... launch) {
  check_pointers(kind, {{ga_ptr, "ga_ptr"}, {g_ptr, "g_ptr"}, {pre_ptr, "pre_ptr"}, {scale_ptr, "scale_ptr"},
                        {shift_ptr, "shift_ptr"}, {dbias_ptr, "dbias_ptr"}, {dscale_ptr, "dscale_ptr"},
                        {dshift_ptr, "dshift_ptr"}});
  check_editor_sizes(n, d);
  pybind11::gil_scoped_release release;
  return kernel(out(ga_ptr), in(g_ptr), in(pre_ptr), in(scale_ptr), in(shift_ptr), out(dbias_ptr), out(dscale_ptr),
                out(dshift_ptr), n, d, launch...);
}

}  // namespace mend_binding

#endif  // MEND_EDITOR_BINDINGS_H_
