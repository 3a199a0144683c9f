// bitnet's ternary matmul: weights in {-1, 0, +1} packed 2 bits each, inputs as int8 codes,
// exact int32 sums. Built on first use by nn/kernel_build.py (torch.utils.cpp_extension).
//
// Layout (pack): each output row is padded to a multiple of 256 weights and stored as 64-byte
// blocks of 256 weights. Byte j of a block holds, in bits 2l..2l+1, the code + 1 (0, 1 or 2) of
// weight 64*l + j of that block. One 64-byte load and a shift by 2l then gives 64 consecutive
// codes + 1, which line up with 64 consecutive input codes: no shuffles in the inner loop.
// The rows are stored four by four, as the kernels read them: in each whole group of four rows,
// block b of row r is at (4 * b + r) * 64 bytes from the group's start, so a tile of four rows
// is one stream through memory, which the CPU's prefetchers follow at full speed (four streams
// of a few hundred bytes each, row by row, ran at half the speed from memory). Rows past the
// last whole group are stored one after another.
//
// The sum of (w + 1) * x is what the SIMD instructions compute (unsigned by signed bytes); the
// sum of x is taken off once per token and row: sum(w * x) = sum((w + 1) * x) - sum(x).
// Every path (AVX-512 VNNI, AVX2, portable C++) computes that same integer exactly.

// Only ATen's core and the op registry are included (not torch/extension.h): the build takes
// a few seconds instead of half a minute. The ops are torch.ops.bitnet_ternary.*.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "ternary_kernel.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define BITNET_X86 1
#endif

namespace bitnet {

int64_t padded(int64_t k) { return (k + BLOCK - 1) / BLOCK * BLOCK; }

namespace {

constexpr int64_t BLOCK_BYTES = 64;  // bytes per block
constexpr int64_t ROWS = 4;   // output rows computed together: each input load serves four
constexpr int64_t TOKENS = 4; // tokens computed together: each unpacked block serves four

// A tile of ROWS packed weight rows against T padded token rows of int8 codes:
// out[r * TOKENS + t] = sum over the row of (w + 1) * x[t].
template <int T>
void tile_portable(const uint8_t* const* w, int64_t stride, const int8_t* const* x, int64_t blocks,
                   int32_t* out) {
  for (int r = 0; r < ROWS; ++r)
    for (int t = 0; t < T; ++t) {
      int32_t sum = 0;
      for (int64_t b = 0; b < blocks; ++b) {
        const uint8_t* wb = w[r] + b * stride;
        const int8_t* xb = x[t] + b * BLOCK;
        for (int l = 0; l < 4; ++l)
          for (int j = 0; j < BLOCK_BYTES; ++j)
            sum += int32_t((wb[j] >> (2 * l)) & 3) * int32_t(xb[64 * l + j]);
      }
      out[r * TOKENS + t] = sum;
    }
}

#ifdef BITNET_X86
__attribute__((target("avx2")))
inline int32_t sum_avx2(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

template <int T>
__attribute__((target("avx2")))
void tile_avx2(const uint8_t* const* w, int64_t stride, const int8_t* const* x, int64_t blocks,
               int32_t* out) {
  const __m256i mask = _mm256_set1_epi8(3);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[ROWS][T];
  for (int r = 0; r < ROWS; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_si256();
  for (int64_t b = 0; b < blocks; ++b)
    for (int half = 0; half < 2; ++half) {
      __m256i v[ROWS];
      for (int r = 0; r < ROWS; ++r)
        v[r] = _mm256_loadu_si256((const __m256i*)(w[r] + b * stride + 32 * half));
      for (int l = 0; l < 4; ++l) {
        __m256i xv[T];
        for (int t = 0; t < T; ++t)
          xv[t] = _mm256_loadu_si256((const __m256i*)(x[t] + b * BLOCK + 32 * half + 64 * l));
        for (int r = 0; r < ROWS; ++r) {
          const __m256i u = _mm256_and_si256(_mm256_srli_epi16(v[r], 2 * l), mask);
          // (w + 1) <= 2 and |x| <= 128: a pair's sum fits int16 without saturating.
          for (int t = 0; t < T; ++t)
            acc[r][t] = _mm256_add_epi32(acc[r][t],
                                         _mm256_madd_epi16(_mm256_maddubs_epi16(u, xv[t]), ones));
        }
      }
    }
  for (int r = 0; r < ROWS; ++r)
    for (int t = 0; t < T; ++t) out[r * TOKENS + t] = sum_avx2(acc[r][t]);
}

template <int T>
__attribute__((target("avx512f,avx512bw,avx512vnni")))
void tile_vnni(const uint8_t* const* w, int64_t stride, const int8_t* const* x, int64_t blocks,
               int32_t* out) {
  const __m512i mask = _mm512_set1_epi8(3);
  __m512i acc[ROWS][T];
  for (int r = 0; r < ROWS; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_si512();
  for (int64_t b = 0; b < blocks; ++b) {
    __m512i v[ROWS];
    for (int r = 0; r < ROWS; ++r) v[r] = _mm512_loadu_si512((const void*)(w[r] + b * stride));
    for (int l = 0; l < 4; ++l) {
      __m512i xv[T];
      for (int t = 0; t < T; ++t)
        xv[t] = _mm512_loadu_si512((const void*)(x[t] + b * BLOCK + 64 * l));
      for (int r = 0; r < ROWS; ++r) {
        const __m512i u = _mm512_and_si512(_mm512_srli_epi16(v[r], 2 * l), mask);
        for (int t = 0; t < T; ++t) acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], u, xv[t]);
      }
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int t = 0; t < T; ++t) out[r * TOKENS + t] = _mm512_reduce_add_epi32(acc[r][t]);
}
#endif

// w[r] + b * stride: block b of the tile's row r.
using TileKernel = void (*)(const uint8_t* const*, int64_t, const int8_t* const*, int64_t,
                           int32_t*);

// The tile kernel of a path for 1..TOKENS tokens (index count - 1).
std::array<TileKernel, TOKENS> kernels_for(int64_t isa) {
#ifdef BITNET_X86
  if (isa == VNNI) return {tile_vnni<1>, tile_vnni<2>, tile_vnni<3>, tile_vnni<4>};
  if (isa == AVX2) return {tile_avx2<1>, tile_avx2<2>, tile_avx2<3>, tile_avx2<4>};
#endif
  return {tile_portable<1>, tile_portable<2>, tile_portable<3>, tile_portable<4>};
}

}  // namespace

namespace {
// The fastest path the engines may use (limit_paths): the best one that passed kernel.py's
// checks, or the one BITNET_KERNEL names, so that one machine can run another CPU's paths.
int64_t max_isa = VNNI;
}  // namespace

// A path is offered only where the CPU has every instruction it uses: AVX2's loops also use FMA
// and F16C (the float16 head), the VNNI path all of AVX2's and AVX-512 F/BW/VNNI. A VM may mask
// any of them; then the next path, never an illegal instruction.
bool cpu_has(int64_t isa) {
#ifdef BITNET_X86
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  if (isa == AVX2) return avx2;
  if (isa == VNNI)
    return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vnni");
#endif
  return isa == PORTABLE;
}

bool supports(int64_t isa) { return isa <= max_isa && cpu_has(isa); }

int64_t resolve_isa(int64_t isa) {
  if (isa != AUTO) {
    TORCH_CHECK(supports(isa), "this CPU cannot run the requested kernel path");
    return isa;
  }
  for (int64_t best : {VNNI, AVX2}) if (supports(best)) return best;
  return PORTABLE;
}

// codes: (out, in) int8 in {-1, 0, 1} -> (out, padded(in) / 4) uint8 in the layout above.
at::Tensor pack(const at::Tensor& codes) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kChar, "pack wants 2-d int8 codes");
  const auto c = codes.contiguous();
  const int64_t n = c.size(0), k = c.size(1), kp = padded(k);
  auto packed = at::zeros({n, kp / 4}, at::kByte);
  const int8_t* src = c.data_ptr<int8_t>();
  uint8_t* dst = packed.data_ptr<uint8_t>();
  for (int64_t row = 0; row < n; ++row)
    for (int64_t i = 0; i < k; ++i) {
      const int8_t w = src[row * k + i];
      TORCH_CHECK(w >= -1 && w <= 1, "ternary codes must be -1, 0 or 1");
      const int64_t block = i / BLOCK, within = i % BLOCK, group = row / ROWS * ROWS;
      const int64_t at = group + ROWS <= n  // in a whole group of four rows: interleaved
                             ? group * (kp / 4) + (block * ROWS + row - group) * BLOCK_BYTES
                             : row * (kp / 4) + block * BLOCK_BYTES;
      dst[at + within % 64] |= uint8_t(w + 1) << (2 * (within / 64));
    }
  return packed;
}

void check_packed(const at::Tensor& packed, int64_t k) {
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte && packed.is_contiguous(),
              "packed must be contiguous 2-d uint8");
  TORCH_CHECK(packed.size(1) * 4 == padded(k), "packed rows do not hold ", k, " weights");
}

void ternary_sums(const Tokens& x, const at::Tensor& packed, int64_t isa, int32_t* out) {
  isa = resolve_isa(isa);
  const int64_t m = x.m, kp = x.kp, n = packed.size(0);
  const uint8_t* wd = packed.data_ptr<uint8_t>();
  const int8_t* xd = x.codes.data();
  const auto kernels = kernels_for(isa);
  const int64_t blocks = kp / BLOCK, row_bytes = kp / 4, tiles = (n + ROWS - 1) / ROWS;
  // Threads over tiles of output rows through torch's own pool: torch.set_num_threads governs it.
  at::parallel_for(0, tiles, 8, [&](int64_t begin, int64_t end) {
    const uint8_t* rows[ROWS];
    const int8_t* tokens[TOKENS];
    int32_t result[ROWS * TOKENS];
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t r0 = tile * ROWS, count_r = std::min(ROWS, n - r0);
      // A whole group of four rows is interleaved block by block (see pack); the rows of a
      // last, short tile are plain, and it repeats its last row (the repeats are not written).
      const bool whole = r0 + ROWS <= n;
      for (int64_t r = 0; r < ROWS; ++r)
        rows[r] = whole ? wd + r0 * row_bytes + r * BLOCK_BYTES
                        : wd + std::min(r0 + r, n - 1) * row_bytes;
      const int64_t stride = whole ? ROWS * BLOCK_BYTES : BLOCK_BYTES;
      for (int64_t t0 = 0; t0 < m; t0 += TOKENS) {
        const int64_t count_t = std::min(TOKENS, m - t0);
        for (int64_t t = 0; t < count_t; ++t) tokens[t] = xd + (t0 + t) * kp;
        kernels[count_t - 1](rows, stride, tokens, blocks, result);
        for (int64_t r = 0; r < count_r; ++r)
          for (int64_t t = 0; t < count_t; ++t)
            out[(t0 + t) * n + r0 + r] = result[r * TOKENS + t] - x.sums[t0 + t];
      }
    }
  });
}

namespace {

// One token's activations as int8 codes, as activation_codes makes them: the absmax scale
// (torch evaluates its 127.0 / amax as amax.reciprocal() * 127.0), each value times the scale
// rounded half to even. Returns the sum of the codes. Inlined into each target below, so that
// the AVX2 copy is vectorized (vroundps rounds as nearbyint does).
__attribute__((always_inline)) inline int32_t quantize_row(const float* row, int64_t k,
                                                           int8_t* codes, float* scale_out) {
  float amax = 0.0f;
  for (int64_t i = 0; i < k; ++i) amax = std::max(amax, std::fabs(row[i]));
  const float scale = (1.0f / std::max(amax, 1e-5f)) * 127.0f;
  *scale_out = scale;
  int32_t sum = 0;
  for (int64_t i = 0; i < k; ++i) {
    codes[i] = int8_t(std::nearbyint(row[i] * scale));
    sum += codes[i];
  }
  return sum;
}

int32_t quantize_portable(const float* row, int64_t k, int8_t* codes, float* scale) {
  return quantize_row(row, k, codes, scale);
}

#ifdef BITNET_X86
__attribute__((target("avx2")))
int32_t quantize_avx2(const float* row, int64_t k, int8_t* codes, float* scale) {
  return quantize_row(row, k, codes, scale);
}
#else
int32_t quantize_avx2(const float* row, int64_t k, int8_t* codes, float* scale) {
  return quantize_row(row, k, codes, scale);
}
#endif

}  // namespace

Tokens quantize_tokens(const float* x, int64_t m, int64_t k, int64_t isa) {
  const int64_t kp = padded(k);
  Tokens tokens{std::vector<int8_t>(m * kp, 0), std::vector<int32_t>(m, 0),
                std::vector<float>(m), m, kp};
  const auto quantize = resolve_isa(isa) >= AVX2 ? quantize_avx2 : quantize_portable;
  at::parallel_for(0, m, 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      tokens.sums[t] = quantize(x + t * k, k, tokens.codes.data() + t * kp, &tokens.scales[t]);
  });
  return tokens;
}

}  // namespace bitnet

using namespace bitnet;

// x: (m, in) int8 codes; packed: (out, padded(in) / 4) -> (m, out) int32, exactly x @ codes.T.
at::Tensor ternary_mm(const at::Tensor& x, const at::Tensor& packed, int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kChar, "x must be 2-d int8");
  const auto xc = x.contiguous();
  const int64_t m = xc.size(0), k = xc.size(1), n = packed.size(0), kp = padded(k);
  check_packed(packed, k);
  Tokens tokens{std::vector<int8_t>(m * kp, 0), std::vector<int32_t>(m, 0),
                std::vector<float>(m, 1.0f), m, kp};
  const int8_t* xd = xc.data_ptr<int8_t>();
  for (int64_t t = 0; t < m; ++t)
    for (int64_t i = 0; i < k; ++i) {
      tokens.codes[t * kp + i] = xd[t * k + i];
      tokens.sums[t] += xd[t * k + i];
    }
  auto out = at::empty({m, n}, at::kInt);
  ternary_sums(tokens, packed, isa, out.data_ptr<int32_t>());
  return out;
}

// The whole BitLinear at inference, as the int8 engine computes it, in one call: each token of
// x (m, in) float32 quantized to int8 codes by absmax (round half to even, as torch.round), the
// exact sums against the packed rows, then sum / (x_scale * w_scale[row]) in float32. The same
// float operations in the same order as activation_codes and Int8Linear.forward, so the output
// is theirs to the bit (built without -ffast-math or FMA contraction).
at::Tensor ternary_linear(const at::Tensor& x, const at::Tensor& packed,
                          const at::Tensor& w_scale, int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be 2-d float32");
  TORCH_CHECK(w_scale.dim() == 1 && w_scale.scalar_type() == at::kFloat &&
              w_scale.size(0) == packed.size(0), "one float32 scale per packed row");
  const auto xc = x.contiguous();
  const auto ws = w_scale.contiguous();
  const int64_t m = xc.size(0), k = xc.size(1), n = packed.size(0);
  check_packed(packed, k);
  const Tokens tokens = quantize_tokens(xc.data_ptr<float>(), m, k, isa);
  auto out = at::empty({m, n}, at::kFloat);
  float* od = out.data_ptr<float>();
  // The int32 sums first, in the output's own memory, then each rescaled in place.
  static_assert(sizeof(float) == sizeof(int32_t), "sums share the output's memory");
  int32_t* sums = reinterpret_cast<int32_t*>(od);
  ternary_sums(tokens, packed, isa, sums);
  const float* sd = ws.data_ptr<float>();
  for (int64_t t = 0; t < m; ++t)
    for (int64_t r = 0; r < n; ++r)
      od[t * n + r] = float(sums[t * n + r]) / (tokens.scales[t] * sd[r]);
  return out;
}

std::vector<int64_t> isas() {
  std::vector<int64_t> found;
  for (int64_t isa : {VNNI, AVX2, PORTABLE}) if (supports(isa)) found.push_back(isa);
  return found;
}

void limit_paths(int64_t isa) {
  TORCH_CHECK(isa >= PORTABLE && isa <= VNNI, "no kernel path ", isa);
  max_isa = isa;
}

TORCH_LIBRARY(bitnet_ternary, m) {
  m.def("pack(Tensor codes) -> Tensor");  // ternary codes -> 2-bit blocks
  m.def("ternary_mm(Tensor x, Tensor packed, int isa) -> Tensor");  // exact int32 sums
  m.def("ternary_linear(Tensor x, Tensor packed, Tensor scale, int isa) -> Tensor");
  // The kernel paths this CPU runs, fastest first (3 VNNI, 2 AVX2, 1 portable C++), up to the
  // limit set by limit_paths (kernel.py: the best path that passes its checks).
  m.def("isas() -> int[]", &isas);
  m.def("limit_paths(int isa) -> ()", &limit_paths);
}

TORCH_LIBRARY_IMPL(bitnet_ternary, CPU, m) {
  m.impl("pack", &pack);
  m.impl("ternary_mm", &ternary_mm);
  m.impl("ternary_linear", &ternary_linear);
}
