// The ARM paths: NEON (every AArch64 CPU has it) and NEON with the dot-product extension (sdot).
// The dot-product functions carry their own target, so one build (no -march) serves every
// AArch64 CPU and portable.cpp picks what this one has.
#if defined(__aarch64__)

#include <arm_neon.h>

#if defined(__linux__)
#include <asm/hwcap.h>  // HWCAP_ASIMDDP, where the C library's headers lack it
#include <sys/auxv.h>
#elif defined(__APPLE__)
#include <sys/sysctl.h>
#endif

#include "kernels.h"
#include "loops.h"

// gcc's arm_neon.h declares vdotq_s32 for the target "arch=armv8.2-a+dotprod" (and takes no
// other spelling of it), clang's for "dotprod" since clang 19. An older clang declares it only
// where the whole file targets dotprod (-march, or Apple's default CPU): elsewhere that build
// has no dot-product path.
#if !defined(__clang__)
#define BITNET_DOTPROD __attribute__((target("arch=armv8.2-a+dotprod")))
#elif defined(__ARM_FEATURE_DOTPROD) || __clang_major__ >= 19
#define BITNET_DOTPROD __attribute__((target("dotprod")))
#endif

namespace bitnet {
namespace {

// Bits 2l..2l+1 of each byte: the codes + 1 (0, 1 or 2) of 16 of the block's weights
// 64l..64l+63, as signed bytes. The shifts take constants: the loops over l unroll.
BITNET_INLINE int8x16_t block_codes(uint8x16_t v, int l) {
  const uint8x16_t mask = vdupq_n_u8(3);
  switch (l) {
    case 0: return vreinterpretq_s8_u8(vandq_u8(v, mask));
    case 1: return vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(v, 2), mask));
    case 2: return vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(v, 4), mask));
    default: return vreinterpretq_s8_u8(vshrq_n_u8(v, 6));
  }
}

// A lane of the plain tile's int16 sums gets 32 products (w + 1) * x of a block, each in
// [-256, 254]: four blocks stay within int16 (4 * 32 * -256 = -32768, reached only by -128), so
// the tile widens to int32 once per four blocks rather than once per multiply.
constexpr int64_t INT16_BLOCKS = 4;

template <int T>
void tile_neon(const uint8_t* const* w, int64_t stride, const int8_t* const* x, int64_t blocks,
               int32_t* out) {
  int32x4_t acc[ROWS][T];
  for (int r = 0; r < ROWS; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = vdupq_n_s32(0);
  for (int64_t b0 = 0; b0 < blocks; b0 += INT16_BLOCKS) {
    const int64_t b1 = std::min(blocks, b0 + INT16_BLOCKS);
    int16x8_t part[ROWS][T];
    for (int r = 0; r < ROWS; ++r)
      for (int t = 0; t < T; ++t) part[r][t] = vdupq_n_s16(0);
    for (int64_t b = b0; b < b1; ++b)
      for (int q = 0; q < 4; ++q) {
        uint8x16_t v[ROWS];
        for (int r = 0; r < ROWS; ++r) v[r] = vld1q_u8(w[r] + b * stride + 16 * q);
        for (int l = 0; l < 4; ++l) {
          int8x16_t xv[T];
          for (int t = 0; t < T; ++t) xv[t] = vld1q_s8(x[t] + b * BLOCK + 64 * l + 16 * q);
          for (int r = 0; r < ROWS; ++r) {
            const int8x16_t u = block_codes(v[r], l);
            for (int t = 0; t < T; ++t)
              part[r][t] = vmlal_high_s8(vmlal_s8(part[r][t], vget_low_s8(u), vget_low_s8(xv[t])),
                                         u, xv[t]);
          }
        }
      }
    for (int r = 0; r < ROWS; ++r)
      for (int t = 0; t < T; ++t) acc[r][t] = vpadalq_s16(acc[r][t], part[r][t]);
  }
  for (int r = 0; r < ROWS; ++r)
    for (int t = 0; t < T; ++t) out[r * TOKENS + t] = vaddvq_s32(acc[r][t]);
}

#ifdef BITNET_DOTPROD
// sdot adds four products of signed bytes into each int32 lane: the codes + 1 fit as signed.
template <int T>
BITNET_DOTPROD void tile_neon_dot(const uint8_t* const* w, int64_t stride,
                                  const int8_t* const* x, int64_t blocks, int32_t* out) {
  int32x4_t acc[ROWS][T];
  for (int r = 0; r < ROWS; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = vdupq_n_s32(0);
  for (int64_t b = 0; b < blocks; ++b)
    for (int q = 0; q < 4; ++q) {
      uint8x16_t v[ROWS];
      for (int r = 0; r < ROWS; ++r) v[r] = vld1q_u8(w[r] + b * stride + 16 * q);
      for (int l = 0; l < 4; ++l) {
        int8x16_t xv[T];
        for (int t = 0; t < T; ++t) xv[t] = vld1q_s8(x[t] + b * BLOCK + 64 * l + 16 * q);
        for (int r = 0; r < ROWS; ++r) {
          const int8x16_t u = block_codes(v[r], l);
          for (int t = 0; t < T; ++t) acc[r][t] = vdotq_s32(acc[r][t], u, xv[t]);
        }
      }
    }
  for (int r = 0; r < ROWS; ++r)
    for (int t = 0; t < T; ++t) out[r * TOKENS + t] = vaddvq_s32(acc[r][t]);
}
#endif

// Sixteen float16 weights, widened (exactly): lane j of wv[q] is weight 4q + j.
BITNET_INLINE void widen_halves(const uint16_t* bits, float32x4_t* wv) {
  const uint16x8_t low = vld1q_u16(bits), high = vld1q_u16(bits + 8);
  wv[0] = vcvt_f32_f16(vreinterpret_f16_u16(vget_low_u16(low)));
  wv[1] = vcvt_high_f32_f16(vreinterpretq_f16_u16(low));
  wv[2] = vcvt_f32_f16(vreinterpret_f16_u16(vget_low_u16(high)));
  wv[3] = vcvt_high_f32_f16(vreinterpretq_f16_u16(high));
}

// The tail, if any, then the partials summed pairwise as reduce16 (j + 8 is p[q + 2], j + 4 is
// p[q + 1], then lanes + 2 and + 1).
BITNET_INLINE float finish_quarters(const float* x, const uint16_t* row, int64_t whole,
                                    int64_t k, const float32x4_t* p) {
  if (whole != k) {
    float partial[16];
    for (int q = 0; q < 4; ++q) vst1q_f32(partial + 4 * q, p[q]);
    return finish_half_row(x, row, whole, k, partial);
  }
  const float32x4_t s = vaddq_f32(vaddq_f32(p[0], p[2]), vaddq_f32(p[1], p[3]));
  const float32x2_t pair = vadd_f32(vget_low_f32(s), vget_high_f32(s));
  return vget_lane_f32(pair, 0) + vget_lane_f32(pair, 1);
}

// R rows by T tokens: each x load serves R rows, each widened row T tokens, and the sums' many
// chains hide the adds' latency. Each (row, token)'s lanes are the fixed order's partials (lane j
// of p[q]: partial 4q + j; a multiply, then an add, never fused: -ffp-contract=off), so its sum
// is the same bits in any tile. The 32 registers hold four rows of one token, or one row of four
// tokens.
struct HalfTileNeon {
  const float* x;
  int64_t k;
  const uint16_t* w;
  float* out;
  int64_t stride;

  template <int R, int T>
  void run(int64_t v, int64_t t0) const {
    const int64_t whole = k / 16 * 16;
    float32x4_t p[R][T][4];
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t)
        for (int q = 0; q < 4; ++q) p[r][t][q] = vdupq_n_f32(0.0f);
    for (int64_t i = 0; i < whole; i += 16) {
      float32x4_t wv[R][4];
      for (int r = 0; r < R; ++r) widen_halves(w + (v + r) * k + i, wv[r]);
      for (int t = 0; t < T; ++t) {
        float32x4_t xv[4];
        for (int q = 0; q < 4; ++q) xv[q] = vld1q_f32(x + (t0 + t) * k + i + 4 * q);
        for (int r = 0; r < R; ++r)
          for (int q = 0; q < 4; ++q)
            p[r][t][q] = vaddq_f32(p[r][t][q], vmulq_f32(xv[q], wv[r][q]));
      }
    }
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t)
        out[(t0 + t) * stride + v + r] =
            finish_quarters(x + (t0 + t) * k, w + (v + r) * k, whole, k, p[r][t]);
  }
};

void half_rows_neon(const float* x, int64_t m, const uint16_t* w, int64_t k, int64_t begin,
                    int64_t end, float* out, int64_t stride) {
  const HalfTileNeon tile{x, k, w, out, stride};
  if (m == 1)
    row_tiles<4, 1>(tile, m, begin, end);
  else
    row_tiles<1, 4>(tile, m, begin, end);
}

// x * w past the last whole sixteen bytes.
BITNET_INLINE int32_t tail_sum(const int8_t* x, const int8_t* row, int64_t from, int64_t k) {
  int32_t sum = 0;
  for (int64_t i = from; i < k; ++i) sum += int32_t(x[i]) * int32_t(row[i]);
  return sum;
}

// Two products x * w into an int16 lane: |x| <= 127 and |w| <= 128 keep it within 32512, and
// each lane pair is then widened into the int32 sums.
BITNET_INLINE int32x4_t add_products(int32x4_t acc, int8x16_t xv, int8x16_t wv) {
  return vpadalq_s16(acc, vmlal_high_s8(vmull_s8(vget_low_s8(xv), vget_low_s8(wv)), xv, wv));
}

// The int8 rows' tiles of R rows by T tokens (loops.h's row_tiles): out[t * stride + v], exact.
// Each x load serves R rows, each row load T tokens; the 32 registers hold four rows by four
// tokens. Signed by signed bytes: no flip of x, so w_sums is not needed. The dot-product tile
// (sdot: four products straight into an int32 lane) is a struct of its own, since its intrinsic
// is usable only inside a function of the dotprod target.
struct Int8Tile {
  const int8_t* x;
  int64_t x_stride;
  const int8_t* w;
  int64_t k;
  int32_t* out;
  int64_t stride;

  const int8_t* token(int64_t t) const { return x + t * x_stride; }
  int32_t& at(int64_t t, int64_t v) const { return out[t * stride + v]; }
};

struct Int8TileNeon : Int8Tile {
  template <int R, int T>
  void run(int64_t v, int64_t t0) const {
    const int64_t whole = k / 16 * 16;
    int32x4_t acc[R][T];
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t) acc[r][t] = vdupq_n_s32(0);
    for (int64_t i = 0; i < whole; i += 16) {
      int8x16_t wv[R];
      for (int r = 0; r < R; ++r) wv[r] = vld1q_s8(w + (v + r) * k + i);
      for (int t = 0; t < T; ++t) {
        const int8x16_t xv = vld1q_s8(token(t0 + t) + i);
        for (int r = 0; r < R; ++r) acc[r][t] = add_products(acc[r][t], xv, wv[r]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t)
        at(t0 + t, v + r) =
            vaddvq_s32(acc[r][t]) + tail_sum(token(t0 + t), w + (v + r) * k, whole, k);
  }
};

void int8_rows_neon(const int8_t* x, int64_t m, int64_t x_stride, const int8_t* w,
                    const int32_t*, int64_t k, int64_t begin, int64_t end, int32_t* out,
                    int64_t stride) {
  row_tiles<4, 4>(Int8TileNeon{{x, x_stride, w, k, out, stride}}, m, begin, end);
}

#ifdef BITNET_DOTPROD
struct Int8TileNeonDot : Int8Tile {
  template <int R, int T>
  BITNET_DOTPROD void run(int64_t v, int64_t t0) const {
    const int64_t whole = k / 16 * 16;
    int32x4_t acc[R][T];
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t) acc[r][t] = vdupq_n_s32(0);
    for (int64_t i = 0; i < whole; i += 16) {
      int8x16_t wv[R];
      for (int r = 0; r < R; ++r) wv[r] = vld1q_s8(w + (v + r) * k + i);
      for (int t = 0; t < T; ++t) {
        const int8x16_t xv = vld1q_s8(token(t0 + t) + i);
        for (int r = 0; r < R; ++r) acc[r][t] = vdotq_s32(acc[r][t], xv, wv[r]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t)
        at(t0 + t, v + r) =
            vaddvq_s32(acc[r][t]) + tail_sum(token(t0 + t), w + (v + r) * k, whole, k);
  }
};

void int8_rows_neon_dot(const int8_t* x, int64_t m, int64_t x_stride, const int8_t* w,
                        const int32_t*, int64_t k, int64_t begin, int64_t end, int32_t* out,
                        int64_t stride) {
  row_tiles<4, 4>(Int8TileNeonDot{{x, x_stride, w, k, out, stride}}, m, begin, end);
}
#endif

// The float loops as portable.cpp's: AArch64's baseline is NEON, which -O3 vectorizes them with.
float dot_neon(const float* a, const float* b, int64_t n) { return dot_body(a, b, n); }
void add_scaled_neon(float* out, float p, const float* v, int64_t n) {
  add_scaled_body(out, p, v, n);
}
int32_t quantize_neon(const float* row, int64_t k, int8_t* codes, float* scale) {
  return quantize_body(row, k, codes, scale);
}
uint64_t read_neon(const uint8_t* data, int64_t n) { return read_body(data, n); }

bool has_dotprod() {
#if !defined(BITNET_DOTPROD)
  return false;  // this build has no dot-product path
#elif defined(__linux__)
  return getauxval(AT_HWCAP) & HWCAP_ASIMDDP;
#elif defined(__APPLE__)
  // Asked once: every op call checks its path, and this is a system call.
  static const bool has = [] {
    int value = 0;
    size_t size = sizeof(value);
    return sysctlbyname("hw.optional.arm.FEAT_DotProd", &value, &size, nullptr, 0) == 0 && value;
  }();
  return has;
#else
  return false;  // no portable way to ask: the plain NEON path is always right
#endif
}

}  // namespace

bool arm_has(int64_t path) {
  switch (path) {
    case NEON: return true;
    case NEON_DOT: return has_dotprod();
    default: return false;
  }
}

const Kernels NEON_KERNELS = {{tile_neon<1>, tile_neon<2>, tile_neon<3>, tile_neon<4>},
                              half_rows_neon, int8_rows_neon, dot_neon, add_scaled_neon,
                              quantize_neon, read_neon};
#ifdef BITNET_DOTPROD
const Kernels NEON_DOT_KERNELS = {
    {tile_neon_dot<1>, tile_neon_dot<2>, tile_neon_dot<3>, tile_neon_dot<4>},
    half_rows_neon, int8_rows_neon_dot, dot_neon, add_scaled_neon, quantize_neon, read_neon};
#else  // never chosen: arm_has says no
const Kernels NEON_DOT_KERNELS = {{tile_neon<1>, tile_neon<2>, tile_neon<3>, tile_neon<4>},
                                  half_rows_neon, int8_rows_neon, dot_neon, add_scaled_neon,
                                  quantize_neon, read_neon};
#endif

}  // namespace bitnet

#endif
