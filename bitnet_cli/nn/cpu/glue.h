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

// out (m, n) = the exact sums of every token against the packed rows, tiles over threads; each
// thread then calls then(begin, end) for the rows begin..end it summed (for every token).
template <class Then>
void ternary_sums(const Kernels& f, const Tokens& x, const at::Tensor& packed, int32_t* out,
                  const Then& then) {
  const int64_t n = packed.size(0);
  const uint8_t* w = packed.data_ptr<uint8_t>();
  at::parallel_for(0, tile_count(n), 8, [&](int64_t begin, int64_t end) {
    ternary_tiles(f, x, w, n, begin, end, out);
    then(begin * ROWS, std::min(end * ROWS, n));
  });
}

constexpr int64_t GRAIN = 256;  // head rows per task: a few microseconds each

// The whole BitLinear (or several stacked) at inference, as the int8 engine computes it: each
// token of x (m, k) float32 quantized to int8 codes by absmax (round half to even, as
// torch.round), the exact sums against weight's rows (2-bit packed rows, or int8 rows with each
// row's sum of codes in row_sums), then sum / (x_scale * scale[row]) in float32, into out
// (m, n). The same float operations in the same order as activation_codes and
// Int8Linear.forward, so the output is theirs to the bit, and each token's the same in any batch.
void bit_linear(const Kernels& f, const float* x, int64_t m, int64_t k, const at::Tensor& weight,
                const at::Tensor& row_sums, const float* scale, float* out);

}  // namespace bitnet
