// The float loops' one order of operations, and the int8 quantization of activations, as inline
// bodies that each path's file compiles for its own target (so the compiler vectorizes them with
// that path's instructions, and explicit SIMD code keeps the same lanes).
//
// A sum of products runs over sixteen partial sums (a[i] * b[i] into partial i % 16; a tail past
// the last sixteen into partial 0), then adds them pairwise (j + 8, then + 4, + 2, + 1). Built
// with -ffp-contract=off: no FMA, a product is rounded before it is added. So every path, on
// every CPU, gives the same floats bit for bit.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#define BITNET_INLINE __attribute__((always_inline)) inline

namespace bitnet {

BITNET_INLINE float reduce16(float* partial) {
  for (int width = 8; width > 0; width /= 2)
    for (int j = 0; j < width; ++j) partial[j] += partial[j + width];
  return partial[0];
}

BITNET_INLINE float dot_body(const float* a, const float* b, int64_t n) {
  float partial[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) partial[j] += a[i + j] * b[i + j];
  for (; i < n; ++i) partial[0] += a[i] * b[i];
  return reduce16(partial);
}

BITNET_INLINE void add_scaled_body(float* out, float p, const float* v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] += p * v[i];
}

// IEEE half -> float, exactly (every half is a float): normals and subnormals rebuilt by hand,
// so the portable path needs no half type from the compiler or torch.
BITNET_INLINE float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16, exponent = (h >> 10) & 0x1f,
                 mantissa = h & 0x3ff;
  uint32_t bits;
  if (exponent == 0x1f) {
    bits = sign | 0x7f800000 | (mantissa << 13);  // inf, nan
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else {  // zero or subnormal: mantissa * 2^-24, exact in float
    const float value = float(mantissa) * 0x1p-24f;
    std::memcpy(&bits, &value, 4);
    bits |= sign;
  }
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

// The tail of a float16 row past its last whole sixteen, into partial 0, then the pairwise sum.
BITNET_INLINE float finish_half_row(const float* x, const uint16_t* row, int64_t whole,
                                    int64_t k, float* partial) {
  for (int64_t i = whole; i < k; ++i) partial[0] += x[i] * half_to_float(row[i]);
  return reduce16(partial);
}

// Rows begin..end of a weight against m tokens (the float16 head's and the int8 rows'), in tiles
// of R rows by T tokens (T a power of two), each `tile.template run<R, T>(v, t)` for rows v.. and
// tokens t..: a tile's rows are loaded once for all its tokens, and stay in L1 while the next
// tokens read them. Fewer than T tokens left take tiles of half as many; fewer than R rows left,
// tiles of one row. Each (row, token)'s sum has one order whatever tile it is in: the same bits
// as alone.
template <int R, int T, class Tile>
BITNET_INLINE void token_tiles(const Tile& tile, int64_t v, int64_t t, int64_t m) {
  for (; t + T <= m; t += T) tile.template run<R, T>(v, t);
  if constexpr (T > 1) token_tiles<R, T / 2>(tile, v, t, m);
}

template <int R, int T, class Tile>
BITNET_INLINE void row_tiles(const Tile& tile, int64_t m, int64_t begin, int64_t end) {
  int64_t v = begin;
  for (; v + R <= end; v += R) token_tiles<R, T>(tile, v, 0, m);
  for (; v < end; ++v) token_tiles<1, T>(tile, v, 0, m);
}

// One token's activations as int8 codes, as activation_codes makes them: the absmax scale
// (torch evaluates its 127.0 / amax as amax.reciprocal() * 127.0), each value times the scale
// rounded half to even (nearbyint in the default rounding mode). Returns the sum of the codes.
BITNET_INLINE int32_t quantize_body(const float* row, int64_t k, int8_t* codes, float* scale_out) {
  // The largest |x| over sixteen lanes, then over the lanes: a max is exact in any order (a NaN
  // skipped as the one running max skipped it), and one running max was a chain of k dependent
  // maxss, 4 cycles each (a fifth of a batch's projections).
  float lanes[16] = {};
  int64_t i = 0;
  for (; i + 16 <= k; i += 16)
    for (int j = 0; j < 16; ++j) lanes[j] = std::max(lanes[j], std::fabs(row[i + j]));
  for (; i < k; ++i) lanes[0] = std::max(lanes[0], std::fabs(row[i]));
  float amax = 0.0f;
  for (int j = 0; j < 16; ++j) amax = std::max(amax, lanes[j]);
  const float scale = (1.0f / std::max(amax, 1e-5f)) * 127.0f;
  *scale_out = scale;
  int32_t sum = 0;
  for (i = 0; i < k; ++i) {
    codes[i] = int8_t(std::nearbyint(row[i] * scale));
    sum += codes[i];
  }
  return sum;
}

// The bandwidth probe's loop: every byte read once, folded so the reads cannot be skipped.
BITNET_INLINE uint64_t read_body(const uint8_t* data, int64_t n) {
  uint64_t folded[8] = {};
  for (int64_t i = 0; i < n; i += 64)
    for (int j = 0; j < 8; ++j) {
      uint64_t word;
      std::memcpy(&word, data + i + 8 * j, 8);
      folded[j] ^= word;
    }
  return folded[0] ^ folded[1] ^ folded[2] ^ folded[3] ^ folded[4] ^ folded[5] ^ folded[6] ^
         folded[7];
}

}  // namespace bitnet
