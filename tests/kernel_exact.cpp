// The CPU kernel's arithmetic alone, with no torch: every code path this CPU has against exact
// references (int64 sums, double sums) and against the portable path, on many shapes and on the
// extreme values where SIMD sums could overflow or round differently. It runs natively and, built
// for AArch64, under qemu (tests/test_kernel_exact.py). Build it with the kernel's sources:
//   g++ -std=c++17 -O2 -ffp-contract=off tests/kernel_exact.cpp \
//       bitnet_cli/nn/cpu/{portable,x86,arm}.cpp
// Prints "<path>: ok (<n> cases)" for each path; at the first mismatch, one line saying where,
// and exits 1.
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "../bitnet_cli/nn/cpu/kernels.h"
#include "../bitnet_cli/nn/cpu/loops.h"

using namespace bitnet;

namespace {

std::mt19937 rng(20261206);

// Inputs of widths around the block (256) and the SIMD widths (16, 32, 64), and rows around
// whole tiles of four: none, a short last tile, one to two whole tiles and a short one.
const std::vector<int64_t> WIDTHS = {1, 15, 16, 17, 255, 256, 257, 511, 1000, 3000};
const std::vector<int64_t> ROW_COUNTS = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 13};

int64_t cases = 0;
std::string path_label;

[[noreturn]] void mismatch(const std::string& what) {
  std::printf("%s: MISMATCH %s\n", path_label.c_str(), what.c_str());
  std::exit(1);
}

std::string shape(const char* op, int64_t k, int64_t n, int64_t m, int x_mode, int w_mode) {
  char text[160];
  std::snprintf(text, sizeof text, "%s k=%" PRId64 " n=%" PRId64 " m=%" PRId64
                " x_mode=%d w_mode=%d", op, k, n, m, x_mode, w_mode);
  return text;
}

std::string text(double value) {
  char digits[32];
  std::snprintf(digits, sizeof digits, "%.9g", value);
  return digits;
}

int random_int(int low, int high) { return std::uniform_int_distribution<int>(low, high)(rng); }

// Token codes: 0 random (the last token all zero), 1 all 127, 2 all -127, 3 all -128,
// 4 each 127 or -128.
std::vector<int8_t> token_codes(int64_t m, int64_t k, int mode) {
  std::vector<int8_t> x(m * k);
  for (int64_t t = 0; t < m; ++t)
    for (int64_t i = 0; i < k; ++i) {
      int value = 0;
      switch (mode) {
        case 0: value = t == m - 1 && m > 1 ? 0 : random_int(-128, 127); break;
        case 1: value = 127; break;
        case 2: value = -127; break;
        case 3: value = -128; break;
        default: value = random_int(0, 1) ? 127 : -128;
      }
      x[t * k + i] = int8_t(value);
    }
  return x;
}

// Ternary weights: 0 random with row 0 all +1, row 1 all -1 and row 2 all 0; 1 all +1; 2 all -1.
std::vector<int8_t> ternary_codes(int64_t n, int64_t k, int mode) {
  std::vector<int8_t> w(n * k);
  for (int64_t r = 0; r < n; ++r)
    for (int64_t i = 0; i < k; ++i) {
      int value = mode == 1 ? 1 : mode == 2 ? -1 : random_int(-1, 1);
      if (mode == 0 && r < 3) value = r == 0 ? 1 : r == 1 ? -1 : 0;
      w[r * k + i] = int8_t(value);
    }
  return w;
}

// pack + ternary_tiles (split at a tile, as threads split them) against the int64 sums.
void check_ternary(const Kernels& f, int64_t k, int64_t n, int64_t m, int x_mode, int w_mode) {
  const std::vector<int8_t> w = ternary_codes(n, k, w_mode), x = token_codes(m, k, x_mode);
  std::vector<uint8_t> packed(n * padded(k) / 4, 0);
  if (!pack(w.data(), n, k, 0, n, packed.data())) mismatch(shape("pack", k, n, m, x_mode, w_mode));
  Tokens tokens(m, k);
  for (int64_t t = 0; t < m; ++t)
    for (int64_t i = 0; i < k; ++i) {
      tokens.codes[t * tokens.kp + i] = x[t * k + i];
      tokens.sums[t] += x[t * k + i];
    }
  std::vector<int32_t> out(m * n, 0);
  const int64_t tiles = tile_count(n), split = tiles / 2;
  ternary_tiles(f, tokens, packed.data(), n, 0, split, out.data());
  ternary_tiles(f, tokens, packed.data(), n, split, tiles, out.data());
  for (int64_t t = 0; t < m; ++t)
    for (int64_t r = 0; r < n; ++r) {
      int64_t exact = 0;
      for (int64_t i = 0; i < k; ++i) exact += int64_t(w[r * k + i]) * x[t * k + i];
      if (out[t * n + r] != exact)
        mismatch(shape("ternary_tiles", k, n, m, x_mode, w_mode) + " token " +
                 std::to_string(t) + " row " + std::to_string(r) + ": " +
                 std::to_string(out[t * n + r]) + ", exact " + std::to_string(exact));
    }
  ++cases;
}

// int8_rows of m tokens (codes in [-127, 127], as the API takes them; weights any int8) against
// the int64 sums, in two calls split at a row: x 0 random, 1 all 127, 2 all -127, 3 all zero;
// w 0 random, 1 all 127, 2 all -128, 3 each 127 or -128. The tokens sit a padded row apart, as
// the decode step's do.
void check_int8(const Kernels& f, int64_t k, int64_t n, int64_t m, int x_mode, int w_mode) {
  const int64_t x_stride = padded(k);
  std::vector<int8_t> x(m * x_stride, 0), w(n * k);
  for (int64_t t = 0; t < m; ++t)
    for (int64_t i = 0; i < k; ++i)
      x[t * x_stride + i] = int8_t(x_mode == 0   ? random_int(-127, 127)
                                   : x_mode == 1 ? 127
                                   : x_mode == 2 ? -127
                                                 : 0);
  for (auto& value : w)
    value = int8_t(w_mode == 0   ? random_int(-128, 127)
                   : w_mode == 1 ? 127
                   : w_mode == 2 ? -128
                   : random_int(0, 1) ? 127
                                      : -128);
  std::vector<int32_t> w_sums(n, 0), out(m * n, 0);
  for (int64_t r = 0; r < n; ++r)
    for (int64_t i = 0; i < k; ++i) w_sums[r] += w[r * k + i];
  const int64_t split = n / 2;
  f.int8_rows(x.data(), m, x_stride, w.data(), w_sums.data(), k, 0, split, out.data(), n);
  f.int8_rows(x.data(), m, x_stride, w.data(), w_sums.data(), k, split, n, out.data(), n);
  for (int64_t t = 0; t < m; ++t)
    for (int64_t r = 0; r < n; ++r) {
      int64_t exact = 0;
      for (int64_t i = 0; i < k; ++i) exact += int64_t(x[t * x_stride + i]) * w[r * k + i];
      if (out[t * n + r] != exact)
        mismatch(shape("int8_rows", k, n, m, x_mode, w_mode) + " token " + std::to_string(t) +
                 " row " + std::to_string(r) + ": " + std::to_string(out[t * n + r]) +
                 ", exact " + std::to_string(exact));
    }
  ++cases;
}

// A float16's bits, no inf or nan: 0 any (subnormals, zeros and up to 65504 among them),
// 1 subnormal or zero, 2 of size 2^-4 to 2^3.
uint16_t random_half(int mode) {
  const uint16_t sign = uint16_t(random_int(0, 1) << 15), mantissa = uint16_t(random_int(0, 0x3ff));
  const int exponent = mode == 0 ? random_int(0, 30) : mode == 1 ? 0 : random_int(11, 18);
  return uint16_t(sign | exponent << 10 | mantissa);
}

// half_rows of m tokens bit for bit as the portable path's for each token alone (the fixed
// order, whatever the batch), and near the double sums: within 1e-5 of the sum of the products'
// sizes (a sum that cancels has no relative accuracy to speak of). x 0 normal, 1 up to +-1000;
// w as random_half's modes.
void check_half(const Kernels& f, int64_t k, int64_t n, int64_t m, int x_mode, int w_mode) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(m * k);
  for (auto& value : x)
    value = x_mode == 0 ? normal(rng) : std::uniform_real_distribution<float>(-1000, 1000)(rng);
  std::vector<uint16_t> w(n * k);
  for (auto& bits : w) bits = random_half(w_mode);
  std::vector<float> out(m * n, 0.0f), portable(n, 0.0f);
  const int64_t split = n / 2;
  f.half_rows(x.data(), m, w.data(), k, 0, split, out.data(), n);
  f.half_rows(x.data(), m, w.data(), k, split, n, out.data(), n);
  const std::string where = shape("half_rows", k, n, m, x_mode, w_mode);
  for (int64_t t = 0; t < m; ++t) {
    const float* xt = x.data() + t * k;
    PORTABLE_KERNELS.half_rows(xt, 1, w.data(), k, 0, n, portable.data(), n);
    for (int64_t r = 0; r < n; ++r) {
      const float got = out[t * n + r];
      const std::string at = where + " token " + std::to_string(t) + " row " + std::to_string(r);
      if (std::memcmp(&got, &portable[r], sizeof(float)) != 0)
        mismatch(at + ": " + text(got) + ", portable alone " + text(portable[r]) +
                 " (bits differ)");
      double exact = 0, size = 0;
      for (int64_t i = 0; i < k; ++i) {
        const double product = double(xt[i]) * half_to_float(w[r * k + i]);
        exact += product;
        size += std::fabs(product);
      }
      if (std::fabs(got - exact) > 1e-5 * size + 1e-30)
        mismatch(at + ": " + text(got) + ", double sum " + text(exact));
    }
  }
  ++cases;
}

// quantize as the portable path's (codes, their sum, the scale's bits) on rows of size
// 0 normal, 1 1e-30, 2 1e30, 3 all zero, 4 zero but one 1e4.
void check_quantize(const Kernels& f, int64_t k, int mode) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> row(k);
  for (auto& value : row)
    value = mode == 0 ? normal(rng) : mode == 1 ? normal(rng) * 1e-30f
          : mode == 2 ? normal(rng) * 1e30f : 0.0f;
  if (mode == 4) row[random_int(0, int(k) - 1)] = 1e4f;
  std::vector<int8_t> codes(k), portable_codes(k);
  float scale, portable_scale;
  const int32_t sum = f.quantize(row.data(), k, codes.data(), &scale);
  const int32_t portable_sum =
      PORTABLE_KERNELS.quantize(row.data(), k, portable_codes.data(), &portable_scale);
  if (sum != portable_sum || codes != portable_codes ||
      std::memcmp(&scale, &portable_scale, sizeof(float)) != 0)
    mismatch(shape("quantize", k, 1, 1, mode, 0) + ": sum " + std::to_string(sum) +
             ", portable " + std::to_string(portable_sum));
  ++cases;
}

// dot and add_scaled bit for bit as the portable path's.
void check_floats(const Kernels& f, int64_t k) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> a(k), b(k);
  for (int64_t i = 0; i < k; ++i) a[i] = normal(rng), b[i] = normal(rng);
  const float dot = f.dot(a.data(), b.data(), k);
  const float portable = PORTABLE_KERNELS.dot(a.data(), b.data(), k);
  if (std::memcmp(&dot, &portable, sizeof(float)) != 0)
    mismatch(shape("dot", k, 1, 1, 0, 0) + ": " + text(dot) + ", portable " + text(portable));
  std::vector<float> out = a, portable_out = a;
  f.add_scaled(out.data(), 0.37f, b.data(), k);
  PORTABLE_KERNELS.add_scaled(portable_out.data(), 0.37f, b.data(), k);
  if (std::memcmp(out.data(), portable_out.data(), k * sizeof(float)) != 0)
    mismatch(shape("add_scaled", k, 1, 1, 0, 0));
  ++cases;
}

void check_path(int64_t path) {
  const Kernels& f = kernels_for(path);
  int index = 0;
  for (int64_t k : WIDTHS) {
    for (int64_t n : ROW_COUNTS) {
      check_ternary(f, k, n, 1 + index % 6, index % 5, index / 5 % 3);
      check_int8(f, k, n, 1 + index % 7, index % 4, index / 4 % 4);
      check_half(f, k, n, 1 + index % 9, index % 2, index / 2 % 3);
      ++index;
    }
    for (int mode = 0; mode < 5; ++mode) check_quantize(f, k, mode);
    check_floats(f, k);
  }
  // The sums' extremes on every tile width: one token to two tiles of tokens, the int16 runs
  // of the SIMD tiles (8 blocks, and past them), whole and short tiles of rows.
  for (int64_t k : {2048, 3000})
    for (int64_t n : {5, 8})
      for (int64_t m = 1; m <= 6; ++m)
        for (int x_mode = 1; x_mode <= 4; ++x_mode)
          for (int w_mode = 1; w_mode <= 2; ++w_mode) check_ternary(f, k, n, m, x_mode, w_mode);
  for (int x_mode = 1; x_mode <= 2; ++x_mode)
    for (int w_mode = 1; w_mode <= 3; ++w_mode)
      for (int64_t m : {1, 5}) check_int8(f, 3000, 9, m, x_mode, w_mode);
}

}  // namespace

int main() {
  for (int64_t path = LAST_PATH; path >= PORTABLE; --path) {
    if (!cpu_has(path)) continue;
    path_label = path_name(path);
    cases = 0;
    check_path(path);
    std::printf("%s: ok (%" PRId64 " cases)\n", path_label.c_str(), cases);
    std::fflush(stdout);
  }
  return 0;
}
