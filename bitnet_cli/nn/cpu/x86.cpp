// The x86 paths: AVX2 (with FMA and F16C), AVX-VNNI and AVX-512 VNNI. Each function carries its
// own target, so one build serves every x86 CPU and portable.cpp picks what this one has.
#if defined(__x86_64__) || defined(_M_X64)

#include <cpuid.h>
#include <immintrin.h>

#include "kernels.h"
#include "loops.h"

// AVX-VNNI intrinsics arrived in GCC 11 and clang 12: an older compiler builds without that path.
#if (defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11)
#define BITNET_AVX_VNNI 1
#endif

namespace bitnet {
namespace {

// A tile's sums are int32 lanes; a lane of _mm256_maddubs_epi16 is (w + 1) * x for two bytes:
// |.| <= 2 * 2 * 128 = 512. A block adds eight of them to a lane (two halves, four shifts), so
// eight blocks stay within int16 (8 * 8 * 512 = 32768, reached only by -32768): one token's tile
// adds them as int16 and widens once per eight blocks, which saves an instruction in four.
constexpr int64_t INT16_BLOCKS = 8;

// How far ahead a tile asks for its blocks, into L2: a tile is one stream through memory, and
// with the hardware prefetchers alone the loads waited on memory while the sums waited on the
// loads (one 265 MB matrix at one token read at 17-18 GB/s of the machine's 28; 16 KB ahead
// into L2: 20-22; 1-4 KB ahead, or into L1, gained little).
constexpr int64_t PREFETCH_BLOCKS = 64;

// Every cache line of block b + PREFETCH_BLOCKS of a tile (four lines when its four rows are
// interleaved, one for a last, short tile's row).
BITNET_INLINE void prefetch_ahead(const uint8_t* w, int64_t b, int64_t stride) {
  const char* ahead = (const char*)(w + (b + PREFETCH_BLOCKS) * stride);
  for (int64_t line = 0; line < stride; line += 64) _mm_prefetch(ahead + line, _MM_HINT_T1);
}

__attribute__((target("avx2"))) inline int32_t sum8(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

template <int T>
__attribute__((target("avx2"))) void tile_avx2(const uint8_t* const* w, int64_t stride,
                                                const int8_t* const* x, int64_t blocks,
                                                int32_t* out) {
  const __m256i mask = _mm256_set1_epi8(3);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[ROWS][T];
  for (int r = 0; r < ROWS; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_si256();
  for (int64_t b0 = 0; b0 < blocks; b0 += INT16_BLOCKS) {
    const int64_t b1 = std::min(blocks, b0 + INT16_BLOCKS);
    __m256i part[ROWS][T];  // int16 sums of this run of blocks (one token), else unused
    for (int r = 0; r < ROWS; ++r)
      for (int t = 0; t < T; ++t) part[r][t] = _mm256_setzero_si256();
    for (int64_t b = b0; b < b1; ++b) {
      prefetch_ahead(w[0], b, stride);
      for (int half = 0; half < 2; ++half) {
        __m256i v[ROWS];
        for (int r = 0; r < ROWS; ++r)
          v[r] = _mm256_loadu_si256((const __m256i*)(w[r] + b * stride + 32 * half));
        for (int l = 0; l < 4; ++l) {
          __m256i xv[T];
          for (int t = 0; t < T; ++t)
            xv[t] = _mm256_loadu_si256((const __m256i*)(x[t] + b * BLOCK + 32 * half + 64 * l));
          for (int r = 0; r < ROWS; ++r) {
            const __m256i u = _mm256_and_si256(l ? _mm256_srli_epi16(v[r], 2 * l) : v[r], mask);
            for (int t = 0; t < T; ++t) {
              const __m256i pairs = _mm256_maddubs_epi16(u, xv[t]);
              if constexpr (T == 1)
                part[r][t] = _mm256_add_epi16(part[r][t], pairs);
              else  // four tokens' int16 sums would not fit the registers: widen each
                acc[r][t] = _mm256_add_epi32(acc[r][t], _mm256_madd_epi16(pairs, ones));
            }
          }
        }
      }
    }
    if constexpr (T == 1)
      for (int r = 0; r < ROWS; ++r)
        acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(part[r][0], ones));
  }
  for (int r = 0; r < ROWS; ++r)
    for (int t = 0; t < T; ++t) out[r * TOKENS + t] = sum8(acc[r][t]);
}

#ifdef BITNET_AVX_VNNI
// AVX2's tile with one vpdpbusd (unsigned (w + 1) by signed x, four bytes into an int32 lane)
// where AVX2 takes maddubs, madd and add. vpdpbusd waits on its accumulator (5 cycles): one
// token's tile keeps a chain per half block, so eight chains run at once, not four.
template <int T>
__attribute__((target("avx2,avxvnni"))) void tile_avx_vnni(const uint8_t* const* w,
                                                           int64_t stride,
                                                           const int8_t* const* x,
                                                           int64_t blocks, int32_t* out) {
  constexpr int CHAINS = T == 1 ? 2 : 1;
  const __m256i mask = _mm256_set1_epi8(3);
  __m256i acc[ROWS][T][CHAINS];
  for (int r = 0; r < ROWS; ++r)
    for (int t = 0; t < T; ++t)
      for (int c = 0; c < CHAINS; ++c) acc[r][t][c] = _mm256_setzero_si256();
  for (int64_t b = 0; b < blocks; ++b) {
    prefetch_ahead(w[0], b, stride);
    for (int half = 0; half < 2; ++half) {
      __m256i v[ROWS];
      for (int r = 0; r < ROWS; ++r)
        v[r] = _mm256_loadu_si256((const __m256i*)(w[r] + b * stride + 32 * half));
      for (int l = 0; l < 4; ++l) {
        __m256i xv[T];
        for (int t = 0; t < T; ++t)
          xv[t] = _mm256_loadu_si256((const __m256i*)(x[t] + b * BLOCK + 32 * half + 64 * l));
        for (int r = 0; r < ROWS; ++r) {
          const __m256i u = _mm256_and_si256(l ? _mm256_srli_epi16(v[r], 2 * l) : v[r], mask);
          for (int t = 0; t < T; ++t) {
            __m256i& chain = acc[r][t][half % CHAINS];
            chain = _mm256_dpbusd_avx_epi32(chain, u, xv[t]);
          }
        }
      }
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int t = 0; t < T; ++t)
      out[r * TOKENS + t] = sum8(CHAINS == 1 ? acc[r][t][0]
                                             : _mm256_add_epi32(acc[r][t][0], acc[r][t][CHAINS - 1]));
}
#endif

// The same with 64-byte loads; one token's tile keeps two chains per row (even and odd shifts).
template <int T>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void tile_avx512(
    const uint8_t* const* w, int64_t stride, const int8_t* const* x, int64_t blocks,
    int32_t* out) {
  constexpr int CHAINS = T == 1 ? 2 : 1;
  const __m512i mask = _mm512_set1_epi8(3);
  __m512i acc[ROWS][T][CHAINS];
  for (int r = 0; r < ROWS; ++r)
    for (int t = 0; t < T; ++t)
      for (int c = 0; c < CHAINS; ++c) acc[r][t][c] = _mm512_setzero_si512();
  for (int64_t b = 0; b < blocks; ++b) {
    prefetch_ahead(w[0], b, stride);
    __m512i v[ROWS];
    for (int r = 0; r < ROWS; ++r) v[r] = _mm512_loadu_si512((const void*)(w[r] + b * stride));
    for (int l = 0; l < 4; ++l) {
      __m512i xv[T];
      for (int t = 0; t < T; ++t)
        xv[t] = _mm512_loadu_si512((const void*)(x[t] + b * BLOCK + 64 * l));
      for (int r = 0; r < ROWS; ++r) {
        const __m512i u = _mm512_and_si512(_mm512_srli_epi16(v[r], 2 * l), mask);
        for (int t = 0; t < T; ++t) {
          __m512i& chain = acc[r][t][l % CHAINS];
          chain = _mm512_dpbusd_epi32(chain, u, xv[t]);
        }
      }
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int t = 0; t < T; ++t)
      out[r * TOKENS + t] = _mm512_reduce_add_epi32(
          CHAINS == 1 ? acc[r][t][0] : _mm512_add_epi32(acc[r][t][0], acc[r][t][CHAINS - 1]));
}

// The sixteen partials as two halves of eight (lanes j and j + 8), summed pairwise as reduce16.
__attribute__((target("avx2,f16c"))) inline float reduce_halves(__m256 low, __m256 high) {
  const __m256 s8 = _mm256_add_ps(low, high);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

__attribute__((target("avx2,f16c"))) inline float finish_halves(const float* x,
                                                                const uint16_t* row,
                                                                int64_t whole, int64_t k,
                                                                __m256 low, __m256 high) {
  if (whole == k) return reduce_halves(low, high);
  float partial[16];
  _mm256_storeu_ps(partial, low);
  _mm256_storeu_ps(partial + 8, high);
  return finish_half_row(x, row, whole, k, partial);
}

// A tile's R rows (consecutive, so one stream through memory) at the step that reads `bytes` of
// them from `offset` in the stream: ask, into L2, for the lines PREFETCH_BLOCKS blocks' bytes
// ahead. With the hardware prefetchers alone the 95M shape's float16 head at one token took 7.8
// ms on one thread of a machine that reads it in 1.9.
BITNET_INLINE void prefetch_tile(const void* rows, int64_t offset, int64_t bytes) {
  const char* ahead = (const char*)rows + offset + PREFETCH_BLOCKS * 256;
  for (int64_t line = 0; line < bytes; line += 64) _mm_prefetch(ahead + line, _MM_HINT_T1);
}

// R rows by T tokens: each x load serves R rows, each widened row T tokens, and R * T pairs of
// sums hide the adds' latency (one row's two chains of adds left the loads waiting). Each
// (row, token)'s lanes are the fixed order's sixteen partials (low: 0-7, high: 8-15), so its sum
// is the same bits in any tile. The sixteen ymm registers hold four rows of one token, or one row
// of four tokens.
struct HalfTileAvx2 {
  const float* x;
  int64_t k;
  const uint16_t* w;
  float* out;
  int64_t stride;

  template <int R, int T>
  __attribute__((target("avx2,f16c"))) void run(int64_t v, int64_t t0) const {
    const int64_t whole = k / 16 * 16;
    __m256 low[R][T], high[R][T];
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t) low[r][t] = high[r][t] = _mm256_setzero_ps();
    for (int64_t i = 0; i < whole; i += 16) {
      prefetch_tile(w + v * k, 2 * R * i, 32 * R);
      __m256 w0[R], w1[R];
      for (int r = 0; r < R; ++r) {
        const uint16_t* bits = w + (v + r) * k + i;
        w0[r] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)bits));
        w1[r] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(bits + 8)));
      }
      for (int t = 0; t < T; ++t) {
        const float* xt = x + (t0 + t) * k + i;
        const __m256 x0 = _mm256_loadu_ps(xt), x1 = _mm256_loadu_ps(xt + 8);
        for (int r = 0; r < R; ++r) {
          low[r][t] = _mm256_add_ps(low[r][t], _mm256_mul_ps(x0, w0[r]));
          high[r][t] = _mm256_add_ps(high[r][t], _mm256_mul_ps(x1, w1[r]));
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t)
        out[(t0 + t) * stride + v + r] =
            finish_halves(x + (t0 + t) * k, w + (v + r) * k, whole, k, low[r][t], high[r][t]);
  }
};

__attribute__((target("avx2,f16c"))) void half_rows_avx2(const float* x, int64_t m,
                                                         const uint16_t* w, int64_t k,
                                                         int64_t begin, int64_t end, float* out,
                                                         int64_t stride) {
  const HalfTileAvx2 tile{x, k, w, out, stride};
  if (m == 1)
    row_tiles<4, 1>(tile, m, begin, end);
  else
    row_tiles<1, 4>(tile, m, begin, end);
}

// As AVX2's, each (row, token)'s sixteen partials one 512-bit register: four rows by four tokens.
__attribute__((target("avx512f,avx2,f16c"))) inline float finish_wide(const float* x,
                                                                      const uint16_t* row,
                                                                      int64_t whole, int64_t k,
                                                                      __m512 acc) {
  return finish_halves(x, row, whole, k, _mm512_castps512_ps256(acc),
                       _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc), 1)));
}

struct HalfTileAvx512 {
  const float* x;
  int64_t k;
  const uint16_t* w;
  float* out;
  int64_t stride;

  template <int R, int T>
  __attribute__((target("avx512f,avx2,f16c"))) void run(int64_t v, int64_t t0) const {
    const int64_t whole = k / 16 * 16;
    __m512 acc[R][T];
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
    for (int64_t i = 0; i < whole; i += 16) {
      prefetch_tile(w + v * k, 2 * R * i, 32 * R);
      __m512 wv[R];
      for (int r = 0; r < R; ++r)
        wv[r] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(w + (v + r) * k + i)));
      for (int t = 0; t < T; ++t) {
        const __m512 xv = _mm512_loadu_ps(x + (t0 + t) * k + i);
        for (int r = 0; r < R; ++r) acc[r][t] = _mm512_add_ps(acc[r][t], _mm512_mul_ps(xv, wv[r]));
      }
    }
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t)
        out[(t0 + t) * stride + v + r] =
            finish_wide(x + (t0 + t) * k, w + (v + r) * k, whole, k, acc[r][t]);
  }
};

__attribute__((target("avx512f,avx2,f16c"))) void half_rows_avx512(const float* x, int64_t m,
                                                                   const uint16_t* w, int64_t k,
                                                                   int64_t begin, int64_t end,
                                                                   float* out, int64_t stride) {
  row_tiles<4, 4>(HalfTileAvx512{x, k, w, out, stride}, m, begin, end);
}

// AVX2 has no unsigned-by-signed dot product of its own: |w| times x with w's sign. Codes are
// at most 127 in size, so a pair of products stays within int16.
__attribute__((target("avx2"))) inline __m256i signed_products(__m256i xv, __m256i wv) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(wv), _mm256_sign_epi8(xv, wv)),
                           _mm256_set1_epi16(1));
}

// x * w past the last whole vector; `bias` is added to each x (the flipped paths' 128).
BITNET_INLINE int32_t tail_sum(const int8_t* x, const int8_t* row, int64_t from, int64_t k,
                               int32_t bias) {
  int32_t sum = 0;
  for (int64_t i = from; i < k; ++i) sum += (int32_t(x[i]) + bias) * int32_t(row[i]);
  return sum;
}

// m tokens' codes as x + 128, in rows of `width` bytes (zeros past k): the unsigned side of
// vpdpbusd, flipped once per call, not per row. The rows' sums take 128 * sum(w) off again
// (each row's, computed once at load).
struct Flipped {
  std::vector<uint8_t> codes;
  int64_t width;
  Flipped(const int8_t* x, int64_t m, int64_t x_stride, int64_t k, int64_t width)
      : codes(m * width), width(width) {
    for (int64_t t = 0; t < m; ++t)
      for (int64_t i = 0; i < std::min(k, width); ++i)
        codes[t * width + i] = uint8_t(x[t * x_stride + i]) ^ 0x80;
  }
  const uint8_t* token(int64_t t) const { return codes.data() + t * width; }
};

// The int8 rows' tiles of R rows by T tokens (loops.h's row_tiles): out[t * stride + v], exact.
// Each x load serves R rows, each row load T tokens.
struct Int8Tile {
  const int8_t* x;
  int64_t x_stride;
  const int8_t* w;
  const int32_t* w_sums;
  int64_t k;
  int32_t* out;
  int64_t stride;

  const int8_t* token(int64_t t) const { return x + t * x_stride; }
  int32_t& at(int64_t t, int64_t v) const { return out[t * stride + v]; }
};

struct Int8TileAvx2 : Int8Tile {
  template <int R, int T>
  __attribute__((target("avx2"))) void run(int64_t v, int64_t t0) const {
    const int64_t whole = k / 32 * 32;
    __m256i acc[R][T];
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_si256();
    for (int64_t i = 0; i < whole; i += 32) {
      prefetch_tile(w + v * k, R * i, 32 * R);
      __m256i wv[R];
      for (int r = 0; r < R; ++r) wv[r] = _mm256_loadu_si256((const __m256i*)(w + (v + r) * k + i));
      for (int t = 0; t < T; ++t) {
        const __m256i xv = _mm256_loadu_si256((const __m256i*)(token(t0 + t) + i));
        for (int r = 0; r < R; ++r)
          acc[r][t] = _mm256_add_epi32(acc[r][t], signed_products(xv, wv[r]));
      }
    }
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t)
        at(t0 + t, v + r) = sum8(acc[r][t]) + tail_sum(token(t0 + t), w + (v + r) * k, whole, k, 0);
  }
};

// AVX2 and AVX-VNNI: the sixteen ymm registers hold four rows by two tokens.
void int8_rows_avx2(const int8_t* x, int64_t m, int64_t x_stride, const int8_t* w,
                    const int32_t* w_sums, int64_t k, int64_t begin, int64_t end, int32_t* out,
                    int64_t stride) {
  row_tiles<4, 2>(Int8TileAvx2{{x, x_stride, w, w_sums, k, out, stride}}, m, begin, end);
}

#ifdef BITNET_AVX_VNNI
struct Int8TileAvxVnni : Int8Tile {
  const Flipped& flipped;

  template <int R, int T>
  __attribute__((target("avx2,avxvnni"))) void run(int64_t v, int64_t t0) const {
    const int64_t whole = k / 32 * 32;  // the tail past it is summed flipped too
    __m256i acc[R][T];
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_si256();
    for (int64_t i = 0; i < whole; i += 32) {
      prefetch_tile(w + v * k, R * i, 32 * R);
      __m256i wv[R];
      for (int r = 0; r < R; ++r) wv[r] = _mm256_loadu_si256((const __m256i*)(w + (v + r) * k + i));
      for (int t = 0; t < T; ++t) {
        const __m256i xv = _mm256_loadu_si256((const __m256i*)(flipped.token(t0 + t) + i));
        for (int r = 0; r < R; ++r) acc[r][t] = _mm256_dpbusd_avx_epi32(acc[r][t], xv, wv[r]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t)
        at(t0 + t, v + r) = sum8(acc[r][t]) +
                            tail_sum(token(t0 + t), w + (v + r) * k, whole, k, 128) -
                            128 * w_sums[v + r];
  }
};

void int8_rows_avx_vnni(const int8_t* x, int64_t m, int64_t x_stride, const int8_t* w,
                        const int32_t* w_sums, int64_t k, int64_t begin, int64_t end,
                        int32_t* out, int64_t stride) {
  const Flipped flipped(x, m, x_stride, k, k / 32 * 32);
  row_tiles<4, 2>(Int8TileAvxVnni{{x, x_stride, w, w_sums, k, out, stride}, flipped}, m, begin,
                  end);
}
#endif

// R rows are R short streams, which the CPU's prefetchers are slow to follow from memory: each
// step asks for the next R rows' bytes while these are summed. The last step's bytes past a row
// are zero weights (a masked load): they add nothing.
struct Int8TileAvx512 : Int8Tile {
  const Flipped& flipped;

  template <int R, int T>
  __attribute__((target("avx512f,avx512bw,avx512vnni"))) void run(int64_t v, int64_t t0) const {
    __m512i acc[R][T];
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_si512();
    for (int64_t i = 0; i < k; i += 64) {
      const __mmask64 mask = k - i >= 64 ? ~0ULL : ~0ULL >> (64 - (k - i));
      __m512i wv[R];
      for (int r = 0; r < R; ++r) {
        _mm_prefetch((const char*)(w + (v + R + r) * k + i), _MM_HINT_T0);
        wv[r] = _mm512_maskz_loadu_epi8(mask, w + (v + r) * k + i);
      }
      for (int t = 0; t < T; ++t) {
        const __m512i xv = _mm512_loadu_si512(flipped.token(t0 + t) + i);
        for (int r = 0; r < R; ++r) acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], xv, wv[r]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t)
        at(t0 + t, v + r) = _mm512_reduce_add_epi32(acc[r][t]) - 128 * w_sums[v + r];
  }
};

// Four rows by four tokens.
void int8_rows_avx512(const int8_t* x, int64_t m, int64_t x_stride, const int8_t* w,
                      const int32_t* w_sums, int64_t k, int64_t begin, int64_t end, int32_t* out,
                      int64_t stride) {
  const Flipped flipped(x, m, x_stride, k, (k + 63) / 64 * 64);
  row_tiles<4, 4>(Int8TileAvx512{{x, x_stride, w, w_sums, k, out, stride}, flipped}, m, begin,
                  end);
}

// dot's sixteen partials as SIMD lanes, summed pairwise as reduce_halves: the generic body's
// reduction was compiled to sixteen dependent scalar adds, the most of a 64-wide dot's time
// (attention's, every position of every head).
__attribute__((target("avx2,f16c"))) inline float finish_dot(const float* a, const float* b,
                                                             int64_t i, int64_t n, __m256 low,
                                                             __m256 high) {
  if (i == n) return reduce_halves(low, high);
  float partial[16];
  _mm256_storeu_ps(partial, low);
  _mm256_storeu_ps(partial + 8, high);
  for (; i < n; ++i) partial[0] += a[i] * b[i];
  return reduce16(partial);
}

__attribute__((target("avx2,f16c"))) float dot_avx2(const float* a, const float* b, int64_t n) {
  __m256 low = _mm256_setzero_ps(), high = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    low = _mm256_add_ps(low, _mm256_mul_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i)));
    high = _mm256_add_ps(high, _mm256_mul_ps(_mm256_loadu_ps(a + i + 8),
                                             _mm256_loadu_ps(b + i + 8)));
  }
  return finish_dot(a, b, i, n, low, high);
}
__attribute__((target("avx2"))) void add_scaled_avx2(float* out, float p, const float* v,
                                                     int64_t n) {
  add_scaled_body(out, p, v, n);
}
__attribute__((target("avx2"))) int32_t quantize_avx2(const float* row, int64_t k,
                                                      int8_t* codes, float* scale) {
  return quantize_body(row, k, codes, scale);
}
__attribute__((target("avx512f,avx2,f16c"))) float dot_avx512(const float* a, const float* b,
                                                               int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i)));
  return finish_dot(a, b, i, n, _mm512_castps512_ps256(acc),
                    _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc), 1)));
}
__attribute__((target("avx512f"))) void add_scaled_avx512(float* out, float p, const float* v,
                                                          int64_t n) {
  add_scaled_body(out, p, v, n);
}

__attribute__((target("avx2"))) uint64_t read_avx2(const uint8_t* data, int64_t n) {
  __m256i folded[4] = {};
  for (int64_t i = 0; i < n; i += 128)
    for (int j = 0; j < 4; ++j)
      folded[j] = _mm256_xor_si256(folded[j], _mm256_loadu_si256((const __m256i*)(data + i + 32 * j)));
  const __m256i all = _mm256_xor_si256(_mm256_xor_si256(folded[0], folded[1]),
                                       _mm256_xor_si256(folded[2], folded[3]));
  return uint64_t(_mm256_extract_epi64(all, 0) ^ _mm256_extract_epi64(all, 1) ^
                  _mm256_extract_epi64(all, 2) ^ _mm256_extract_epi64(all, 3));
}
__attribute__((target("avx512f"))) uint64_t read_avx512(const uint8_t* data, int64_t n) {
  __m512i folded[4] = {};
  for (int64_t i = 0; i < n; i += 256)
    for (int j = 0; j < 4; ++j)
      folded[j] = _mm512_xor_si512(folded[j], _mm512_loadu_si512(data + i + 64 * j));
  const __m512i all = _mm512_xor_si512(_mm512_xor_si512(folded[0], folded[1]),
                                       _mm512_xor_si512(folded[2], folded[3]));
  return uint64_t(_mm512_reduce_or_epi64(all));
}

// The features __builtin_cpu_supports does not name on every compiler (clang 14 knows no
// "f16c"), from CPUID itself: asked once, since CPUID traps to the hypervisor in a VM (tens of
// microseconds) and every op call checks its path.
struct CpuidFeatures {
  bool f16c = false, avx_vnni = false;
  CpuidFeatures() {
    unsigned a, b, c, d;
    if (__get_cpuid(1, &a, &b, &c, &d)) f16c = c >> 29 & 1;
    if (__get_cpuid_count(7, 1, &a, &b, &c, &d)) avx_vnni = a >> 4 & 1;
  }
};

const CpuidFeatures& cpuid_features() {
  static const CpuidFeatures features;
  return features;
}

}  // namespace

// AVX2's loops also use FMA's and F16C's encodings (the float16 head), the others all of
// AVX2's: a VM may mask any feature, and then the next path runs, never an illegal instruction.
bool x86_has(int64_t path) {
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    cpuid_features().f16c;
  switch (path) {
    case AVX2: return avx2;
#ifdef BITNET_AVX_VNNI
    case AVX_VNNI: return avx2 && cpuid_features().avx_vnni;
#endif
    case AVX512:
      return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vnni");
    default: return false;
  }
}

const Kernels AVX2_KERNELS = {{tile_avx2<1>, tile_avx2<2>, tile_avx2<3>, tile_avx2<4>},
                              half_rows_avx2, int8_rows_avx2, dot_avx2, add_scaled_avx2,
                              quantize_avx2, read_avx2};
#ifdef BITNET_AVX_VNNI
const Kernels AVX_VNNI_KERNELS = {
    {tile_avx_vnni<1>, tile_avx_vnni<2>, tile_avx_vnni<3>, tile_avx_vnni<4>},
    half_rows_avx2, int8_rows_avx_vnni, dot_avx2, add_scaled_avx2, quantize_avx2, read_avx2};
#else  // never chosen: x86_has says no
const Kernels AVX_VNNI_KERNELS = {{tile_avx2<1>, tile_avx2<2>, tile_avx2<3>, tile_avx2<4>},
                                  half_rows_avx2, int8_rows_avx2, dot_avx2, add_scaled_avx2,
                                  quantize_avx2, read_avx2};
#endif
const Kernels AVX512_KERNELS = {
    {tile_avx512<1>, tile_avx512<2>, tile_avx512<3>, tile_avx512<4>},
    half_rows_avx512, int8_rows_avx512, dot_avx512, add_scaled_avx512, quantize_avx2,
    read_avx512};

}  // namespace bitnet

#endif
