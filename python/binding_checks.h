// Argument checks shared by the pybind11 modules mend_kernels._C (bindings.cpp) and
// mend_kernels._C_cuda (bindings_cuda.cpp): each failed check raises ValueError naming the argument
// and what was expected. Only pybind11 and the C ABI's plain types: no CPU- or CUDA-specific code.
#ifndef MEND_BINDING_CHECKS_H_
#define MEND_BINDING_CHECKS_H_

#include <pybind11/pybind11.h>

#include <cstdint>
#include <initializer_list>
#include <utility>
#include <string>
#include <tuple>
#include <vector>

#include "mend/kernels.h"

namespace mend_binding {

inline void require(bool ok, const char* message) {
  if (!ok) throw pybind11::value_error(message);
}

// `kind` names the memory the module expects ("data" for host, "device" for CUDA).
inline void require_pointer(uintptr_t ptr, const char* name, const char* kind, const char* note = "") {
  if (ptr == 0)
    throw pybind11::value_error(std::string(name) + " must be a non-null " + kind + " pointer" + note);
}

// Non-null pointers, each named in the error.
inline void check_pointers(const char* kind, std::initializer_list<std::pair<uintptr_t, const char*>> pointers) {
  for (const auto& [ptr, name] : pointers) require_pointer(ptr, name, kind);
}

// The editor kernels' (n, d) row blocks.
inline void check_editor_sizes(int64_t n, int64_t d) {
  require(n >= 1, "n (rows) must be >= 1");
  require(d >= 1, "d (columns) must be >= 1");
}

// MEND_DTYPE_* code of W's dtype name.
inline int dtype_code(const std::string& dtype) {
  if (dtype == "float32") return MEND_DTYPE_FLOAT32;
  if (dtype == "bfloat16") return MEND_DTYPE_BFLOAT16;
  if (dtype == "float16") return MEND_DTYPE_FLOAT16;
  throw pybind11::value_error("dtype must be one of 'float32', 'bfloat16', 'float16', got '" + dtype + "'");
}

// rank_update: W (M, N; row stride ldw), A (K, M), B (K, N).
inline void check_rank_update(const char* kind, uintptr_t w_ptr, uintptr_t a_ptr, uintptr_t b_ptr, int64_t M,
                              int64_t N, int64_t ldw, int64_t K) {
  require_pointer(w_ptr, "w_ptr", kind);
  require_pointer(a_ptr, "a_ptr", kind);
  require_pointer(b_ptr, "b_ptr", kind);
  require(M >= 1, "M (rows of W) must be >= 1");
  require(N >= 1, "N (columns of W) must be >= 1");
  require(K >= 1, "K (rank, rows of A and B) must be >= 1");
  require(ldw >= N, "ldw (row stride of W, in elements) must be >= N");
}

// A batched rank update's weights, from Python tuples (w_ptr, dtype, M, N, ldw, a_ptr, b_ptr, K, scale)
// checked one by one like rank_update's arguments; an error names the index of the bad tuple.
inline std::vector<mend_rank_update_desc> rank_update_descriptors(const char* kind, const pybind11::list& items) {
  typedef std::tuple<uintptr_t, std::string, int64_t, int64_t, int64_t, uintptr_t, uintptr_t, int64_t, float> Fields;
  require(!items.empty(), "descriptors must hold at least one weight");
  std::vector<mend_rank_update_desc> descs;
  for (size_t i = 0; i < items.size(); ++i) {
    const std::string where = "descriptors[" + std::to_string(i) + "]: ";
    Fields f;
    try {
      f = items[i].cast<Fields>();
    } catch (const pybind11::cast_error&) {
      throw pybind11::value_error(where + "expected a tuple (w_ptr, dtype, M, N, ldw, a_ptr, b_ptr, K, scale)");
    }
    const auto& [w_ptr, dtype, M, N, ldw, a_ptr, b_ptr, K, scale] = f;
    try {
      const int code = dtype_code(dtype);
      check_rank_update(kind, w_ptr, a_ptr, b_ptr, M, N, ldw, K);
      descs.push_back(mend_rank_update_desc{reinterpret_cast<void*>(w_ptr), code, M, N, ldw,
                                            reinterpret_cast<const float*>(a_ptr),
                                            reinterpret_cast<const float*>(b_ptr), K, scale});
    } catch (const pybind11::value_error& e) {
      throw pybind11::value_error(where + e.what());
    }
  }
  return descs;
}

// running_moments: the sizes of x (n, d; row stride ldx). The pointers and the count are checked by
// each module (the count is a value on the CPU, a device pointer on CUDA).
inline void check_moments_sizes(int64_t n, int64_t d, int64_t ldx) {
  require(n >= 1, "n (rows of x) must be >= 1");
  require(d >= 1, "d (columns of x) must be >= 1");
  require(ldx >= d, "ldx (row stride of x, in elements) must be >= d");
}

}  // namespace mend_binding

#endif  // MEND_BINDING_CHECKS_H_
