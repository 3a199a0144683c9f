// What ternary_kernel.cpp gives the rest of the extension (decode_step.cpp): the 2-bit packed
// layout's exact sums and the int8 quantization of activations, as BitLinear defines it.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace bitnet {

constexpr int64_t BLOCK = 256;  // weights per packed block: rows are padded to whole blocks

enum Isa : int64_t { AUTO = 0, PORTABLE = 1, AVX2 = 2, VNNI = 3 };

int64_t padded(int64_t k);
bool supports(int64_t isa);        // the CPU has the path's instructions, and it is allowed
int64_t resolve_isa(int64_t isa);  // AUTO -> the fastest allowed path; others checked

// Tokens as the kernels read them: int8 codes padded with zeros to whole blocks (a zero input
// adds nothing), each token's sum of codes (for the + 1 stored with every weight) and scale.
struct Tokens {
  std::vector<int8_t> codes;
  std::vector<int32_t> sums;
  std::vector<float> scales;
  int64_t m, kp;
};

// m rows of k floats -> int8 codes by absmax per row, as activation_codes computes them (the
// same codes on every path).
Tokens quantize_tokens(const float* x, int64_t m, int64_t k, int64_t isa);

void check_packed(const at::Tensor& packed, int64_t k);

// out (m, n) = the exact sums of w * x for every token and packed row.
void ternary_sums(const Tokens& x, const at::Tensor& packed, int64_t isa, int32_t* out);

}  // namespace bitnet
