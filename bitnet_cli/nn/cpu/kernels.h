// bitnet's CPU arithmetic in plain C++, with no torch in it: the 2-bit packed layout, the exact
// ternary and int8 sums, the float16 head's float32 sums and the decode step's float loops, once
// per code path. torch_ops.cpp and decode_step.cpp are the torch glue around it (tensors,
// threads); tests/kernel_exact.cpp runs it alone, natively and on ARM under qemu.
#pragma once

#include <cstdint>
#include <vector>

namespace bitnet {

constexpr int64_t BLOCK = 256;      // weights per packed block: rows are padded to whole blocks
constexpr int64_t BLOCK_BYTES = 64; // bytes per block
constexpr int64_t ROWS = 4;         // output rows computed together: each input load serves four
constexpr int64_t TOKENS = 4;       // tokens computed together: each unpacked block serves four

// The code paths: the one numbering of them (Python reads the names through path_name). Within
// one CPU architecture a higher number is a faster path, so "the fastest allowed" is the largest.
enum Path : int64_t {
  AUTO = 0,      // the fastest path allowed (limit_paths) that this CPU has
  PORTABLE = 1,  // plain C++, any CPU
  AVX2 = 2,      // x86 with AVX2, FMA and F16C
  AVX_VNNI = 3,  // + AVX-VNNI (256-bit vpdpbusd: Intel since Alder Lake, AMD Zen 5)
  AVX512 = 4,    // + AVX-512 F/BW/VNNI
  NEON = 5,      // ARMv8 (AArch64): NEON is always there
  NEON_DOT = 6,  // + the dot-product extension (sdot: Apple M1 on, Graviton 2 on)
};
constexpr int64_t LAST_PATH = NEON_DOT;
const char* path_name(int64_t path);  // "portable", "avx2", ...; "" for no such path

// A tile: ROWS packed rows (block b of row r at w[r] + b * stride) against T padded token rows
// of int8 codes: out[r * TOKENS + t] = the sum over the row of (w + 1) * x[t].
using Tile = void (*)(const uint8_t* const* w, int64_t stride, const int8_t* const* x,
                      int64_t blocks, int32_t* out);
// Float16 rows begin..end of w (k wide, IEEE half bits) times each of m float32 tokens (token t
// at x + t * k), summed in float32 in the fixed order of loops.h: out[t * stride + v] for each
// row v and token t, the same bits for any m (a row is widened once for all the tokens).
using HalfRows = void (*)(const float* x, int64_t m, const uint16_t* w, int64_t k,
                          int64_t begin, int64_t end, float* out, int64_t stride);
// Int8 rows begin..end of w (k wide) times each of m tokens' int8 codes in [-127, 127] (token t
// at x + t * x_stride), exactly: out[t * stride + v]; w_sums[v] is row v's sum of codes (paths
// that add 128 to x take 128 * w_sums[v] off again). A row is loaded once for all the tokens.
using Int8Rows = void (*)(const int8_t* x, int64_t m, int64_t x_stride, const int8_t* w,
                          const int32_t* w_sums, int64_t k, int64_t begin, int64_t end,
                          int32_t* out, int64_t stride);

// One path's loops. Every path gives the same integers, and the same floats bit for bit.
struct Kernels {
  Tile tile[TOKENS];  // for 1..TOKENS tokens (index count - 1)
  HalfRows half_rows;
  Int8Rows int8_rows;
  float (*dot)(const float* a, const float* b, int64_t n);
  void (*add_scaled)(float* out, float p, const float* v, int64_t n);  // out += p * v
  // One row of k floats -> int8 codes by absmax (torch's rounding); returns the codes' sum.
  int32_t (*quantize)(const float* row, int64_t k, int8_t* codes, float* scale);
  // Reads n bytes (a multiple of 256) with the path's widest loads: the bandwidth probe.
  uint64_t (*read)(const uint8_t* data, int64_t n);
};

bool cpu_has(int64_t path);       // the CPU (and this build) has every instruction it uses
bool supports(int64_t path);      // cpu_has, and allowed by limit_paths
int64_t fastest_path();           // the fastest supported path
void limit_paths(int64_t path);   // allow paths up to this one (BITNET_KERNEL, failed checks)
const Kernels& kernels_for(int64_t path);  // a path this CPU has (not AUTO)

// Each file's paths (portable.cpp, x86.cpp, arm.cpp).
extern const Kernels PORTABLE_KERNELS;
#if defined(__x86_64__) || defined(_M_X64)
extern const Kernels AVX2_KERNELS, AVX_VNNI_KERNELS, AVX512_KERNELS;
bool x86_has(int64_t path);
#endif
#if defined(__aarch64__)
extern const Kernels NEON_KERNELS, NEON_DOT_KERNELS;
bool arm_has(int64_t path);
#endif

int64_t padded(int64_t k);

// Rows begin..end of codes (n, k) in {-1, 0, 1} -> out (n, padded(k) / 4), zeroed by the caller.
// Returns false if a code is outside {-1, 0, 1}.
bool pack(const int8_t* codes, int64_t n, int64_t k, int64_t begin, int64_t end, uint8_t* out);
// The same from the released 2B4T layout (n / 4, k): byte row j holds rows j, j + n/4, j + n/2,
// j + 3n/4 in bits 0-1, 2-3, 4-5, 6-7, each code + 1. Returns false on a stored 3.
bool repack(const uint8_t* released, int64_t n, int64_t k, int64_t begin, int64_t end,
            uint8_t* out);

// Tokens as the tiles read them: int8 codes padded with zeros to whole blocks (a zero input
// adds nothing), each token's sum of codes (for the + 1 stored with every weight) and scale.
struct Tokens {
  std::vector<int8_t> codes;
  std::vector<int32_t> sums;
  std::vector<float> scales;
  int64_t m, kp;
  Tokens(int64_t rows, int64_t k);
};

// Tiles tile_begin..tile_end (of ROWS packed rows each) of the n-row matrix against every token:
// out (m, n) = the exact sums of w * x. Threads split the tiles (torch_ops.cpp).
void ternary_tiles(const Kernels& f, const Tokens& x, const uint8_t* packed, int64_t n,
                   int64_t tile_begin, int64_t tile_end, int32_t* out);

inline int64_t tile_count(int64_t n) { return (n + ROWS - 1) / ROWS; }

}  // namespace bitnet
