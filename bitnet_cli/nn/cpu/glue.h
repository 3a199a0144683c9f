// The torch side of the kernel shared by torch_ops.cpp and decode_step.cpp: paths checked,
// tensors checked, and the plain arithmetic of kernels.h run on torch's threads.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include "kernels.h"

namespace bitnet {

// AUTO -> the fastest allowed path; any other must be one this CPU has and is allowed.
inline int64_t resolve_path(int64_t path) {
  if (path == AUTO) return fastest_path();
  TORCH_CHECK(supports(path), "this CPU cannot run kernel path ", path, " (",
              path_name(path), ")");
  return path;
}

void check_packed(const at::Tensor& packed, int64_t k);

// m rows of k floats -> codes, the rows spread over torch's threads.
Tokens quantize(const Kernels& f, const float* x, int64_t m, int64_t k);

// out (m, n) = the exact sums of every token against the packed rows, tiles over threads.
void ternary_sums(const Kernels& f, const Tokens& x, const at::Tensor& packed, int32_t* out);

constexpr int64_t GRAIN = 256;  // head rows per task: a few microseconds each

}  // namespace bitnet
