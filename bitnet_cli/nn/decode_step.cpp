// One decoded token through the whole model in one call: the 2bit (and int8) engines' decode
// step, without the hundreds of small torch ops (and their dispatch) that a token costs in
// eager PyTorch. nn/fused_decode.py gathers the model's tensors and calls it for every new token.
//
// The ternary projections are the exact sums the engines compute anywhere (2-bit packed rows
// through ternary_kernel.cpp, or int8 rows through torch._int_mm), rescaled as BitLinear does.
// The float work around them (RMSNorm, RoPE, attention, the gate, the head) is computed here in
// float32 in one fixed order (Loops, below), the same on every path: the logits differ from the
// per-op path's in the last bits, and equal themselves on every CPU and path; the 2bit and int8
// engines share this code, so theirs equal each other's to the bit.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_int_mm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "ternary_kernel.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define BITNET_X86 1
#endif

namespace bitnet {
namespace {

constexpr int64_t RELU2 = 0, SILU = 1;  // the FFN gates (config.ACTIVATIONS)

// The float loops, in one fixed order of operations: a sum of products runs over sixteen
// partial sums (a[i] * b[i] into partial i % 16; a tail past the last sixteen into partial 0),
// then adds them pairwise (j + 8, then + 4, + 2, + 1). Every path computes exactly that, with
// no FMA contraction (built with -ffp-contract=off): the compiler vectorizes the plain loops for
// each path's target, and the float16 head's intrinsics keep the same lanes. So every path, on
// every CPU, gives the same floats bit for bit (kernel_check.py holds each to the portable one).
__attribute__((always_inline)) inline float reduce16(float* partial) {
  for (int width = 8; width > 0; width /= 2)
    for (int j = 0; j < width; ++j) partial[j] += partial[j + width];
  return partial[0];
}

__attribute__((always_inline)) inline float dot_body(const float* a, const float* b, int64_t n) {
  float partial[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) partial[j] += a[i + j] * b[i + j];
  for (; i < n; ++i) partial[0] += a[i] * b[i];
  return reduce16(partial);
}

// out += p * v
__attribute__((always_inline)) inline void add_scaled_body(float* out, float p, const float* v,
                                                           int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] += p * v[i];
}

// One float16 head row: the dot product with the row widened to float32 (exactly), as dot_body.
__attribute__((always_inline)) inline float dot_half_body(const float* x, const c10::Half* w,
                                                          int64_t n) {
  float partial[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) partial[j] += x[i + j] * float(w[i + j]);
  for (; i < n; ++i) partial[0] += x[i] * float(w[i]);
  return reduce16(partial);
}

float dot_portable(const float* a, const float* b, int64_t n) { return dot_body(a, b, n); }
void add_scaled_portable(float* out, float p, const float* v, int64_t n) {
  add_scaled_body(out, p, v, n);
}
void half_rows_portable(const float* x, const c10::Half* w, int64_t k, int64_t begin,
                        int64_t end, float* out) {
  for (int64_t v = begin; v < end; ++v) out[v] = dot_half_body(x, w + v * k, k);
}

#ifdef BITNET_X86
__attribute__((target("avx2"))) float dot_avx2(const float* a, const float* b, int64_t n) {
  return dot_body(a, b, n);
}
__attribute__((target("avx2"))) void add_scaled_avx2(float* out, float p, const float* v,
                                                     int64_t n) {
  add_scaled_body(out, p, v, n);
}
__attribute__((target("avx512f"))) float dot_avx512(const float* a, const float* b, int64_t n) {
  return dot_body(a, b, n);
}
__attribute__((target("avx512f"))) void add_scaled_avx512(float* out, float p, const float* v,
                                                          int64_t n) {
  add_scaled_body(out, p, v, n);
}

// The sixteen partials, as two halves of eight (lanes j and j + 8), summed pairwise as reduce16.
__attribute__((target("avx2,f16c"))) inline float reduce_halves(__m256 low, __m256 high) {
  const __m256 s8 = _mm256_add_ps(low, high);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// A row whose length is not a multiple of 16: the partials spilled, the tail into partial 0.
__attribute__((always_inline)) inline float finish_row(const float* x, const c10::Half* row,
                                                       int64_t whole, int64_t k, float* partial) {
  for (int64_t i = whole; i < k; ++i) partial[0] += x[i] * float(row[i]);
  return reduce16(partial);
}

__attribute__((target("avx2,f16c")))
void half_rows_avx2(const float* x, const c10::Half* w, int64_t k, int64_t begin, int64_t end,
                    float* out) {
  const int64_t whole = k / 16 * 16;
  for (int64_t v = begin; v < end; ++v) {
    const c10::Half* row = w + v * k;
    const uint16_t* bits = reinterpret_cast<const uint16_t*>(row);
    __m256 low = _mm256_setzero_ps(), high = _mm256_setzero_ps();
    for (int64_t i = 0; i < whole; i += 16) {
      const __m256 w0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(bits + i)));
      const __m256 w1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(bits + i + 8)));
      low = _mm256_add_ps(low, _mm256_mul_ps(_mm256_loadu_ps(x + i), w0));
      high = _mm256_add_ps(high, _mm256_mul_ps(_mm256_loadu_ps(x + i + 8), w1));
    }
    if (whole == k) {
      out[v] = reduce_halves(low, high);
    } else {
      float partial[16];
      _mm256_storeu_ps(partial, low);
      _mm256_storeu_ps(partial + 8, high);
      out[v] = finish_row(x, row, whole, k, partial);
    }
  }
}

__attribute__((target("avx512f,avx2,f16c")))
void half_rows_avx512(const float* x, const c10::Half* w, int64_t k, int64_t begin, int64_t end,
                      float* out) {
  const int64_t whole = k / 16 * 16;
  for (int64_t v = begin; v < end; ++v) {
    const c10::Half* row = w + v * k;
    const uint16_t* bits = reinterpret_cast<const uint16_t*>(row);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < whole; i += 16)
      acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_loadu_ps(x + i), _mm512_cvtph_ps(
                                                 _mm256_loadu_si256((const __m256i*)(bits + i)))));
    if (whole == k) {
      out[v] = reduce_halves(_mm512_castps512_ps256(acc),
                             _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc), 1)));
    } else {
      float partial[16];
      _mm512_storeu_ps(partial, acc);
      out[v] = finish_row(x, row, whole, k, partial);
    }
  }
}
#endif

using HalfRows = void (*)(const float*, const c10::Half*, int64_t, int64_t, int64_t, float*);

// A path's float loops.
struct Loops {
  float (*dot)(const float*, const float*, int64_t);
  void (*add_scaled)(float*, float, const float*, int64_t);
  HalfRows half_rows;
};

Loops loops_for(int64_t isa) {
#ifdef BITNET_X86
  if (isa == VNNI) return {dot_avx512, add_scaled_avx512, half_rows_avx512};
  if (isa == AVX2) return {dot_avx2, add_scaled_avx2, half_rows_avx2};
#endif
  return {dot_portable, add_scaled_portable, half_rows_portable};
}

// out = weight * (x / sqrt(mean(x^2) + eps)).
void rms_norm(const Loops& f, const float* x, const float* weight, int64_t n, float eps,
              float* out) {
  const float inv = 1.0f / std::sqrt(f.dot(x, x, n) / float(n) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = weight[i] * (x[i] * inv);
}

// One BitLinear (or several stacked) at one token: x (k) -> out (n), the int8 engine's maths.
void bit_linear(const float* x, int64_t k, const at::Tensor& weight, const at::Tensor& scale,
                int64_t isa, float* out) {
  const int64_t n = weight.size(0);
  const Tokens tokens = quantize_tokens(x, 1, k, isa);
  std::vector<int32_t> sums(n);
  if (weight.scalar_type() == at::kByte) {
    ternary_sums(tokens, weight, isa, sums.data());
  } else {  // the int8 engine: int8 codes, summed by torch._int_mm
    auto codes = at::empty({1, k}, at::kChar);
    std::copy_n(tokens.codes.data(), k, codes.data_ptr<int8_t>());
    const auto acc = at::_int_mm(codes, weight.t());
    std::copy_n(acc.data_ptr<int32_t>(), n, sums.data());
  }
  const float* s = scale.data_ptr<float>();
  for (int64_t r = 0; r < n; ++r) out[r] = float(sums[r]) / (tokens.scales[0] * s[r]);
}

// RoPE on each head of `heads` (count x dim) at one position: x * cos + rotate_half(x) * sin.
void rope(float* heads, int64_t count, int64_t dim, const float* cos, const float* sin) {
  const int64_t half = dim / 2;
  std::vector<float> x(dim);
  for (int64_t h = 0; h < count; ++h) {
    float* v = heads + h * dim;
    std::copy_n(v, dim, x.data());
    for (int64_t i = 0; i < dim; ++i) {
      const float rotated = i < half ? -x[i + half] : x[i - half];
      v[i] = x[i] * cos[i] + rotated * sin[i];
    }
  }
}

// Causal attention of one query token over positions 0..length-1 of the cache, every query head
// reading its group's key/value head (grouped-query attention). cache: (kv_heads, ctx, dim).
void attend(const Loops& f, const float* q, const float* keys, const float* values, int64_t heads,
            int64_t kv_heads, int64_t ctx, int64_t dim, int64_t length, float* out) {
  const float scale = 1.0f / std::sqrt(float(dim));
  const int64_t group = heads / kv_heads;
  at::parallel_for(0, heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(length);
    for (int64_t h = begin; h < end; ++h) {
      const float* qh = q + h * dim;
      const float* kh = keys + (h / group) * ctx * dim;
      const float* vh = values + (h / group) * ctx * dim;
      float most = -INFINITY;
      for (int64_t j = 0; j < length; ++j) {
        scores[j] = f.dot(qh, kh + j * dim, dim) * scale;
        most = std::max(most, scores[j]);
      }
      float total = 0.0f;
      for (int64_t j = 0; j < length; ++j) total += scores[j] = std::exp(scores[j] - most);
      float* oh = out + h * dim;
      std::fill_n(oh, dim, 0.0f);
      for (int64_t j = 0; j < length; ++j) f.add_scaled(oh, scores[j] / total, vh + j * dim, dim);
    }
  });
}

#ifdef BITNET_X86
// The int8 head's sums: dpbusd multiplies unsigned by signed bytes, so the input codes go in
// as x + 128 (flipped once, not per row) and 128 * sum(w) (each row's, computed once at load)
// is taken off again. Four rows at a time share each input load and one final reduction.
__attribute__((target("avx512f,avx512bw,avx512vnni")))
void int8_rows_vnni(const int8_t* x, const int8_t* w, const int32_t* w_sums,
                    int64_t k, int64_t begin, int64_t end, int32_t* out) {
  const int64_t whole = k / 64 * 64;
  const __mmask64 tail = k == whole ? 0 : (~0ULL >> (64 - (k - whole)));
  std::vector<uint8_t> flipped(whole + 64);
  for (int64_t i = 0; i < k; ++i) flipped[i] = uint8_t(x[i]) ^ 0x80;
  const uint8_t* xu = flipped.data();
  int64_t v = begin;
  for (; v + 4 <= end; v += 4) {
    __m512i acc[4];
    for (int r = 0; r < 4; ++r) acc[r] = _mm512_setzero_si512();
    for (int64_t i = 0; i < whole; i += 64) {
      const __m512i xv = _mm512_loadu_si512(xu + i);
      for (int r = 0; r < 4; ++r) {
        // Four rows are four short streams, which the CPU's prefetchers are slow to follow
        // from memory: ask for the next four rows' bytes while these are summed.
        _mm_prefetch((const char*)(w + (v + 4 + r) * k + i), _MM_HINT_T0);
        acc[r] = _mm512_dpbusd_epi32(acc[r], xv, _mm512_loadu_si512(w + (v + r) * k + i));
      }
    }
    if (tail) {  // bytes past the row are zero weights: they add nothing
      const __m512i xv = _mm512_loadu_si512(xu + whole);
      for (int r = 0; r < 4; ++r)
        acc[r] = _mm512_dpbusd_epi32(acc[r], xv,
                                     _mm512_maskz_loadu_epi8(tail, w + (v + r) * k + whole));
    }
    __m256i half[4];
    for (int r = 0; r < 4; ++r)
      half[r] = _mm256_add_epi32(_mm512_castsi512_si256(acc[r]), _mm512_extracti64x4_epi64(acc[r], 1));
    const __m256i all = _mm256_hadd_epi32(_mm256_hadd_epi32(half[0], half[1]),
                                          _mm256_hadd_epi32(half[2], half[3]));
    const __m128i sums = _mm_add_epi32(_mm256_castsi256_si128(all), _mm256_extracti128_si256(all, 1));
    const __m128i offsets = _mm_slli_epi32(_mm_loadu_si128((const __m128i*)(w_sums + v)), 7);
    _mm_storeu_si128((__m128i*)(out + v), _mm_sub_epi32(sums, offsets));
  }
  for (; v < end; ++v) {
    __m512i acc = _mm512_setzero_si512();
    for (int64_t i = 0; i < whole; i += 64)
      acc = _mm512_dpbusd_epi32(acc, _mm512_loadu_si512(xu + i), _mm512_loadu_si512(w + v * k + i));
    if (tail)
      acc = _mm512_dpbusd_epi32(acc, _mm512_loadu_si512(xu + whole),
                                _mm512_maskz_loadu_epi8(tail, w + v * k + whole));
    out[v] = _mm512_reduce_add_epi32(acc) - 128 * w_sums[v];
  }
}

// AVX2 has no unsigned-by-signed dot product of its own: |w| times x with w's sign. Codes are
// at most 127 in size, so a pair of products stays within int16.
__attribute__((target("avx2")))
void int8_rows_avx2(const int8_t* x, const int8_t* w, const int32_t* w_sums,
                    int64_t k, int64_t begin, int64_t end, int32_t* out) {
  (void)w_sums;
  const int64_t whole = k / 32 * 32;
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t v = begin; v < end; ++v) {
    const int8_t* row = w + v * k;
    __m256i acc = _mm256_setzero_si256();
    for (int64_t i = 0; i < whole; i += 32) {
      const __m256i wv = _mm256_loadu_si256((const __m256i*)(row + i));
      const __m256i xv = _mm256_loadu_si256((const __m256i*)(x + i));
      acc = _mm256_add_epi32(acc, _mm256_madd_epi16(
          _mm256_maddubs_epi16(_mm256_abs_epi8(wv), _mm256_sign_epi8(xv, wv)), ones));
    }
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    int32_t sum = _mm_cvtsi128_si32(s);
    for (int64_t i = whole; i < k; ++i) sum += int32_t(x[i]) * int32_t(row[i]);
    out[v] = sum;
  }
}
#endif

void int8_rows(const int8_t* x, const int8_t* w, const int32_t* w_sums, int64_t k,
               int64_t begin, int64_t end, int32_t* out) {
  (void)w_sums;
  for (int64_t v = begin; v < end; ++v) {
    int32_t sum = 0;
    for (int64_t i = 0; i < k; ++i) sum += int32_t(x[i]) * int32_t(w[v * k + i]);
    out[v] = sum;
  }
}

using Int8Rows = void (*)(const int8_t*, const int8_t*, const int32_t*, int64_t, int64_t, int64_t,
                         int32_t*);

Int8Rows int8_rows_for(int64_t isa) {
#ifdef BITNET_X86
  if (isa == VNNI) return int8_rows_vnni;
  if (isa == AVX2) return int8_rows_avx2;
#endif
  return int8_rows;
}

constexpr int64_t GRAIN = 256;  // head rows per task: a few microseconds each

// The output layer at one token: float32 or float16 rows (head_sums undefined), or int8 rows
// with one scale each and their sums of codes, quantized and rescaled as Int8Linear does.
void head_logits(const float* x, int64_t k, const at::Tensor& head, const at::Tensor& scale,
                 const at::Tensor& head_sums, int64_t isa, float* out) {
  const int64_t vocab = head.size(0);
  const Loops f = loops_for(isa);
  if (head.scalar_type() == at::kFloat) {
    const float* w = head.data_ptr<float>();
    at::parallel_for(0, vocab, GRAIN, [&](int64_t b, int64_t e) {
      for (int64_t v = b; v < e; ++v) out[v] = f.dot(x, w + v * k, k);
    });
    return;
  }
  if (head.scalar_type() == at::kHalf) {
    const HalfRows rows = f.half_rows;
    const c10::Half* w = head.data_ptr<c10::Half>();
    at::parallel_for(0, vocab, GRAIN, [&](int64_t b, int64_t e) { rows(x, w, k, b, e, out); });
    return;
  }
  const Tokens tokens = quantize_tokens(x, 1, k, isa);
  const auto rows = int8_rows_for(isa);
  std::vector<int32_t> sums(vocab);
  const int8_t* w = head.data_ptr<int8_t>();
  const int32_t* w_sums = head_sums.data_ptr<int32_t>();
  at::parallel_for(0, vocab, GRAIN, [&](int64_t b, int64_t e) {
    rows(tokens.codes.data(), w, w_sums, k, b, e, sums.data());
  });
  const float* s = scale.data_ptr<float>();
  for (int64_t v = 0; v < vocab; ++v) out[v] = float(sums[v]) / (tokens.scales[0] * s[v]);
}

void check(bool ok, const char* what) { TORCH_CHECK(ok, "decode_step: ", what); }

}  // namespace
}  // namespace bitnet

using namespace bitnet;

// Token `token` at `position` through every layer; its keys and values are written into the
// caches at `position`. Per layer l: norms[4l..4l+3] (input, attention sub-norm, post-attention,
// FFN sub-norm), weights/scales[4l..4l+3] (q|k|v stacked, o, gate|up stacked, down); norms[4L]
// is the final norm. Returns the logits (vocab,) in float32.
at::Tensor decode_step(int64_t token, int64_t position, const at::Tensor& embed,
                       at::TensorList norms, at::TensorList weights, at::TensorList scales,
                       const at::Tensor& head, const at::Tensor& head_scale,
                       const at::Tensor& head_sums, const at::Tensor& cos, const at::Tensor& sin,
                       at::TensorList keys, at::TensorList values, int64_t heads, double eps,
                       int64_t activation, int64_t isa) {
  isa = resolve_isa(isa);
  const Loops f = loops_for(isa);
  const int64_t layers = keys.size(), d = embed.size(1);
  check(layers > 0 && int64_t(values.size()) == layers && int64_t(norms.size()) == 4 * layers + 1 &&
        int64_t(weights.size()) == 4 * layers && int64_t(scales.size()) == 4 * layers,
        "one set of norms, weights and caches per layer");
  const int64_t kv_heads = keys[0].size(1), ctx = keys[0].size(2), dim = keys[0].size(3);
  check(0 <= token && token < embed.size(0), "token id outside the vocabulary");
  check(0 <= position && position < ctx && position < cos.size(0), "position past the context");
  check(heads * dim == d && heads % kv_heads == 0, "heads do not divide the hidden size");
  const int64_t kv = kv_heads * dim, ffn = norms[3].size(0);
  const float feps = float(eps);

  std::vector<float> x(d);  // the token's embedding row, float32 or float16 (2B4T's bench)
  if (embed.scalar_type() == at::kHalf)
    std::copy_n(embed.data_ptr<c10::Half>() + token * d, d, x.begin());
  else
    std::copy_n(embed.data_ptr<float>() + token * d, d, x.begin());
  std::vector<float> normed(std::max(d, ffn)), qkv(d + 2 * kv), attended(d), projected(d),
      gate_up(2 * ffn), hidden(ffn);
  const float* cos_row = cos.data_ptr<float>() + position * dim;
  const float* sin_row = sin.data_ptr<float>() + position * dim;
  for (int64_t l = 0; l < layers; ++l) {
    rms_norm(f, x.data(), norms[4 * l].data_ptr<float>(), d, feps, normed.data());
    bit_linear(normed.data(), d, weights[4 * l], scales[4 * l], isa, qkv.data());
    float* q = qkv.data();
    float* k = q + d;
    float* v = k + kv;
    rope(q, heads, dim, cos_row, sin_row);
    rope(k, kv_heads, dim, cos_row, sin_row);
    float* key_cache = keys[l].data_ptr<float>();
    float* value_cache = values[l].data_ptr<float>();
    for (int64_t h = 0; h < kv_heads; ++h) {
      std::copy_n(k + h * dim, dim, key_cache + (h * ctx + position) * dim);
      std::copy_n(v + h * dim, dim, value_cache + (h * ctx + position) * dim);
    }
    attend(f, q, key_cache, value_cache, heads, kv_heads, ctx, dim, position + 1, attended.data());
    rms_norm(f, attended.data(), norms[4 * l + 1].data_ptr<float>(), d, feps, normed.data());
    bit_linear(normed.data(), d, weights[4 * l + 1], scales[4 * l + 1], isa, projected.data());
    for (int64_t i = 0; i < d; ++i) x[i] += projected[i];

    rms_norm(f, x.data(), norms[4 * l + 2].data_ptr<float>(), d, feps, normed.data());
    bit_linear(normed.data(), d, weights[4 * l + 2], scales[4 * l + 2], isa, gate_up.data());
    for (int64_t i = 0; i < ffn; ++i) {
      const float g = gate_up[i];
      const float gated = activation == RELU2 ? std::max(g, 0.0f) * std::max(g, 0.0f)
                                              : g / (1.0f + std::exp(-g));
      hidden[i] = gated * gate_up[ffn + i];
    }
    rms_norm(f, hidden.data(), norms[4 * l + 3].data_ptr<float>(), ffn, feps, normed.data());
    bit_linear(normed.data(), ffn, weights[4 * l + 3], scales[4 * l + 3], isa, projected.data());
    for (int64_t i = 0; i < d; ++i) x[i] += projected[i];
  }
  rms_norm(f, x.data(), norms[4 * layers].data_ptr<float>(), d, feps, normed.data());
  auto logits = at::empty({head.size(0)}, at::kFloat);
  head_logits(normed.data(), d, head, head_scale, head_sums, isa, logits.data_ptr<float>());
  return logits;
}

// x: (m, in) int8 codes in [-127, 127]; codes: (out, in) int8 -> (m, out) int32, exactly
// x @ codes.T, on the int8 head's code path `isa` (the per-op int8 head: torch._int_mm is not
// exact for full-range int8 codes on every CPU).
at::Tensor int8_mm(const at::Tensor& x, const at::Tensor& codes, int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kChar && codes.dim() == 2 &&
              codes.scalar_type() == at::kChar && x.size(1) == codes.size(1),
              "int8_mm wants int8 (m, k) and (n, k)");
  isa = resolve_isa(isa);
  const auto xc = x.contiguous(), wc = codes.contiguous();
  const int64_t m = xc.size(0), k = xc.size(1), n = wc.size(0);
  const auto w_sums = at::sum(wc, {1}, false, at::kInt);
  auto out = at::empty({m, n}, at::kInt);
  const auto rows = int8_rows_for(isa);
  for (int64_t t = 0; t < m; ++t) {
    const int8_t* row = xc.data_ptr<int8_t>() + t * k;
    at::parallel_for(0, n, GRAIN, [&](int64_t b, int64_t e) {
      rows(row, wc.data_ptr<int8_t>(), w_sums.data_ptr<int32_t>(), k, b, e,
           out.data_ptr<int32_t>() + t * n);
    });
  }
  return out;
}

// x: (m, in) float32; w: (out, in) float16 -> (m, out) float32: the float16 head for a few rows
// (the per-op path's prompt and tokens), summed in float32 exactly as the fused step's head.
at::Tensor half_linear(const at::Tensor& x, const at::Tensor& w, int64_t isa) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && w.dim() == 2 &&
              w.scalar_type() == at::kHalf && x.size(1) == w.size(1),
              "half_linear wants float32 (m, k) and float16 (n, k)");
  const HalfRows rows = loops_for(resolve_isa(isa)).half_rows;
  const auto xc = x.contiguous(), wc = w.contiguous();
  const int64_t m = xc.size(0), k = xc.size(1), n = wc.size(0);
  auto out = at::empty({m, n}, at::kFloat);
  for (int64_t t = 0; t < m; ++t)
    at::parallel_for(0, n, GRAIN, [&](int64_t b, int64_t e) {
      rows(xc.data_ptr<float>() + t * k, wc.data_ptr<c10::Half>(), k, b, e,
           out.data_ptr<float>() + t * n);
    });
  return out;
}

TORCH_LIBRARY_FRAGMENT(bitnet_ternary, m) {
  m.def("half_linear(Tensor x, Tensor w, int isa) -> Tensor");  // the float16 head, float32 sums
  m.def("int8_mm(Tensor x, Tensor codes, int isa) -> Tensor");  // the int8 head's exact sums
  m.def("decode_step(int token, int position, Tensor embed, Tensor[] norms, Tensor[] weights, "
        "Tensor[] scales, Tensor head, Tensor head_scale, Tensor head_sums, Tensor cos, "
        "Tensor sin, Tensor[] keys, Tensor[] values, int heads, float eps, int activation, "
        "int isa) -> Tensor");
}

TORCH_LIBRARY_IMPL(bitnet_ternary, CPU, m) {
  m.impl("decode_step", &decode_step);
  m.impl("int8_mm", &int8_mm);
  m.impl("half_linear", &half_linear);
}
