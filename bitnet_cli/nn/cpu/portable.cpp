// The 2-bit packed layout, the path every CPU runs (plain C++), and the choice among paths.
//
// Layout (pack): each output row is padded to a multiple of 256 weights and stored as 64-byte
// blocks of 256 weights. Byte j of a block holds, in bits 2l..2l+1, the code + 1 (0, 1 or 2) of
// weight 64*l + j of that block. One 64-byte load and a shift by 2l then gives 64 consecutive
// codes + 1, which line up with 64 consecutive input codes: no shuffles in the inner loop.
// The rows are stored four by four, as the tiles read them: in each whole group of four rows,
// block b of row r is at (4 * b + r) * 64 bytes from the group's start, so a tile of four rows
// is one stream through memory, which the CPU's prefetchers follow at full speed (four streams
// of a few hundred bytes each, row by row, ran at half the speed from memory). Rows past the
// last whole group are stored one after another.
//
// The sum of (w + 1) * x is what the SIMD instructions compute (unsigned by signed bytes); the
// sum of x is taken off once per token and row: sum(w * x) = sum((w + 1) * x) - sum(x).
#include "kernels.h"
#include "loops.h"

namespace bitnet {

int64_t padded(int64_t k) { return (k + BLOCK - 1) / BLOCK * BLOCK; }

namespace {

// Lays rows begin..end of an n-row matrix of k codes where the layout puts them (see above),
// each code read as code + 1 (0, 1 or 2) by stored(row, i). Whole blocks are written with four
// plain loads a byte (no branch: the compiler vectorizes it); the last, partial block is ORed
// into zeroed bytes. Returns false if any stored value is past 2.
template <class Stored>
bool lay_out(Stored stored, int64_t n, int64_t k, int64_t begin, int64_t end, uint8_t* out) {
  const int64_t row_bytes = padded(k) / 4;
  uint8_t past = 0;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t group = row / ROWS * ROWS;
    const bool whole = group + ROWS <= n;  // in a whole group of four rows: interleaved
    for (int64_t base = 0; base < k; base += BLOCK) {
      const int64_t block = base / BLOCK;
      uint8_t* dst = out + (whole ? group * row_bytes + (block * ROWS + row - group) * BLOCK_BYTES
                                  : row * row_bytes + block * BLOCK_BYTES);
      if (base + BLOCK <= k) {
        for (int64_t j = 0; j < BLOCK_BYTES; ++j) {
          const uint8_t a = stored(row, base + j), b = stored(row, base + 64 + j),
                        c = stored(row, base + 128 + j), d = stored(row, base + 192 + j);
          past |= uint8_t((a > 2) | (b > 2) | (c > 2) | (d > 2));
          dst[j] = uint8_t(a | b << 2 | c << 4 | d << 6);
        }
      } else {
        for (int64_t i = base; i < k; ++i) {
          const uint8_t v = stored(row, i);
          past |= uint8_t(v > 2);
          dst[(i - base) % 64] |= uint8_t(v << (2 * ((i - base) / 64)));
        }
      }
    }
  }
  return past == 0;
}

}  // namespace

bool pack(const int8_t* codes, int64_t n, int64_t k, int64_t begin, int64_t end, uint8_t* out) {
  return lay_out([=](int64_t row, int64_t i) { return uint8_t(codes[row * k + i] + 1); },
                 n, k, begin, end, out);
}

bool repack(const uint8_t* released, int64_t n, int64_t k, int64_t begin, int64_t end,
            uint8_t* out) {
  const int64_t quarter = n / 4;  // row r is in byte row r % quarter, bits 2 * (r / quarter)
  return lay_out([=](int64_t row, int64_t i) {
    return uint8_t(released[(row % quarter) * k + i] >> (2 * (row / quarter)) & 3);
  }, n, k, begin, end, out);
}

Tokens::Tokens(int64_t rows, int64_t k)
    : codes(rows * padded(k), 0), sums(rows, 0), scales(rows, 1.0f), m(rows), kp(padded(k)) {}

void ternary_tiles(const Kernels& f, const Tokens& x, const uint8_t* packed, int64_t n,
                   int64_t tile_begin, int64_t tile_end, int32_t* out) {
  const int64_t kp = x.kp, blocks = kp / BLOCK, row_bytes = kp / 4;
  const uint8_t* rows[ROWS];
  const int8_t* tokens[TOKENS];
  int32_t result[ROWS * TOKENS];
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t r0 = tile * ROWS, count_r = std::min(ROWS, n - r0);
    // A whole group of four rows is interleaved block by block (see pack); the rows of a last,
    // short tile are plain, and it repeats its last row (the repeats are not written).
    const bool whole = r0 + ROWS <= n;
    for (int64_t r = 0; r < ROWS; ++r)
      rows[r] = whole ? packed + r0 * row_bytes + r * BLOCK_BYTES
                      : packed + std::min(r0 + r, n - 1) * row_bytes;
    const int64_t stride = whole ? ROWS * BLOCK_BYTES : BLOCK_BYTES;
    for (int64_t t0 = 0; t0 < x.m; t0 += TOKENS) {
      const int64_t count_t = std::min(TOKENS, x.m - t0);
      for (int64_t t = 0; t < count_t; ++t) tokens[t] = x.codes.data() + (t0 + t) * kp;
      f.tile[count_t - 1](rows, stride, tokens, blocks, result);
      for (int64_t r = 0; r < count_r; ++r)
        for (int64_t t = 0; t < count_t; ++t)
          out[(t0 + t) * n + r0 + r] = result[r * TOKENS + t] - x.sums[t0 + t];
    }
  }
}

namespace {

template <int T>
void tile_portable(const uint8_t* const* w, int64_t stride, const int8_t* const* x,
                   int64_t blocks, int32_t* out) {
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

// Each row widened to float32 once, then summed with every token in dot's order, which is the
// float16 head's (a product x * w into partial i % 16, the tail into partial 0, reduce16).
void half_rows_portable(const float* x, int64_t m, const uint16_t* w, int64_t k, int64_t begin,
                        int64_t end, float* out, int64_t stride) {
  std::vector<float> row(k);
  for (int64_t v = begin; v < end; ++v) {
    for (int64_t i = 0; i < k; ++i) row[i] = half_to_float(w[v * k + i]);
    for (int64_t t = 0; t < m; ++t) out[t * stride + v] = dot_body(x + t * k, row.data(), k);
  }
}

void int8_rows_portable(const int8_t* x, int64_t m, int64_t x_stride, const int8_t* w,
                        const int32_t*, int64_t k, int64_t begin, int64_t end, int32_t* out,
                        int64_t stride) {
  for (int64_t v = begin; v < end; ++v)
    for (int64_t t = 0; t < m; ++t) {
      int32_t sum = 0;
      for (int64_t i = 0; i < k; ++i) sum += int32_t(x[t * x_stride + i]) * int32_t(w[v * k + i]);
      out[t * stride + v] = sum;
    }
}

float dot_portable(const float* a, const float* b, int64_t n) { return dot_body(a, b, n); }
void add_scaled_portable(float* out, float p, const float* v, int64_t n) {
  add_scaled_body(out, p, v, n);
}
int32_t quantize_portable(const float* row, int64_t k, int8_t* codes, float* scale) {
  return quantize_body(row, k, codes, scale);
}
uint64_t read_portable(const uint8_t* data, int64_t n) { return read_body(data, n); }

int64_t max_path = LAST_PATH;  // limit_paths

}  // namespace

const Kernels PORTABLE_KERNELS = {
    {tile_portable<1>, tile_portable<2>, tile_portable<3>, tile_portable<4>},
    half_rows_portable, int8_rows_portable, dot_portable, add_scaled_portable,
    quantize_portable, read_portable};

const char* path_name(int64_t path) {
  static const char* const names[] = {"", "portable", "avx2", "avxvnni", "avx512", "neon",
                                      "neondot"};
  return path >= PORTABLE && path <= LAST_PATH ? names[path] : "";
}

bool cpu_has(int64_t path) {
  if (path == PORTABLE) return true;
#if defined(__x86_64__) || defined(_M_X64)
  return x86_has(path);
#elif defined(__aarch64__)
  return arm_has(path);
#else
  return false;
#endif
}

bool supports(int64_t path) { return path <= max_path && cpu_has(path); }

int64_t fastest_path() {
  for (int64_t path = LAST_PATH; path > PORTABLE; --path)
    if (supports(path)) return path;
  return PORTABLE;
}

void limit_paths(int64_t path) { max_path = path; }

const Kernels& kernels_for(int64_t path) {
  switch (path) {
#if defined(__x86_64__) || defined(_M_X64)
    case AVX2: return AVX2_KERNELS;
    case AVX_VNNI: return AVX_VNNI_KERNELS;
    case AVX512: return AVX512_KERNELS;
#endif
#if defined(__aarch64__)
    case NEON: return NEON_KERNELS;
    case NEON_DOT: return NEON_DOT_KERNELS;
#endif
    default: return PORTABLE_KERNELS;
  }
}

}  // namespace bitnet
