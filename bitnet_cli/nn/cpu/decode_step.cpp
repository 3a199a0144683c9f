// One decoded token through the whole model in one call: the 2bit (and int8) engines' decode
// step, without the hundreds of small torch ops (and their dispatch) that a token costs in
// eager PyTorch. nn/fused_decode.py gathers the model's tensors and calls it for every new token.
//
// The ternary projections are the exact sums the engines compute anywhere (2-bit packed rows
// through kernels.h's tiles, or int8 rows through its int8 rows), rescaled as BitLinear does.
// The float work around them (RMSNorm, RoPE, attention, the gate, the head) is computed here in
// float32 in loops.h's one order, the same on every path: the logits differ from the per-op
// path's in the last bits, and equal themselves on every CPU and path; the 2bit and int8
// engines share this code, so theirs equal each other's to the bit.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <chrono>
#include <cmath>

#include "glue.h"

namespace bitnet {
namespace {

// The gates' numbers: the order of config.ACTIVATIONS ("relu2", "silu").
constexpr int64_t RELU2 = 0;

// Where the steps' time went since step_profile last asked: seconds per part, and the steps.
enum Part { TERNARY, HEAD, ATTENTION, REST, PARTS };
struct Profile {
  double seconds[PARTS] = {};
  int64_t steps = 0;
};
Profile profile;

// Charges the time since the last mark to a part.
class Stopwatch {
 public:
  void charge(Part part) {
    const auto now = std::chrono::steady_clock::now();
    profile.seconds[part] += std::chrono::duration<double>(now - last_).count();
    last_ = now;
  }

 private:
  std::chrono::steady_clock::time_point last_ = std::chrono::steady_clock::now();
};

// out = weight * (x / sqrt(mean(x^2) + eps)).
void rms_norm(const Kernels& f, const float* x, const float* weight, int64_t n, float eps,
              float* out) {
  const float inv = 1.0f / std::sqrt(f.dot(x, x, n) / float(n) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = weight[i] * (x[i] * inv);
}

// One BitLinear (or several stacked) at one token: x (k) -> out (n), the int8 engine's maths.
// The 2bit engine's weights are packed rows; the int8 engine's int8 rows, with each row's sum of
// codes (`row_sums`, for the paths that add 128 to x), summed by the same int8 rows as the head
// (oneDNN's int8 GEMM behind torch._int_mm was 5x slower on AVX2 at one token).
void bit_linear(const Kernels& f, const float* x, int64_t k, const at::Tensor& weight,
                const at::Tensor& row_sums, const at::Tensor& scale, float* out) {
  const int64_t n = weight.size(0);
  Tokens tokens(1, k);
  tokens.sums[0] = f.quantize(x, k, tokens.codes.data(), &tokens.scales[0]);
  std::vector<int32_t> sums(n);
  if (weight.scalar_type() == at::kByte) {
    ternary_sums(f, tokens, weight, sums.data());
  } else {
    const int8_t* w = weight.data_ptr<int8_t>();
    const int32_t* w_sums = row_sums.data_ptr<int32_t>();
    at::parallel_for(0, n, GRAIN, [&](int64_t b, int64_t e) {
      f.int8_rows(tokens.codes.data(), w, w_sums, k, b, e, sums.data());
    });
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
// reading its group's key/value head (grouped-query attention). cache: (kv_heads, ctx, dim), ctx
// its room (positions past length are never read).
void attend(const Kernels& f, const float* q, const float* keys, const float* values,
            int64_t heads, int64_t kv_heads, int64_t ctx, int64_t dim, int64_t length,
            float* out) {
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

// The output layer at one token: float32 or float16 rows (head_sums undefined), or int8 rows
// with one scale each and their sums of codes, quantized and rescaled as Int8Linear does.
void head_logits(const Kernels& f, const float* x, int64_t k, const at::Tensor& head,
                 const at::Tensor& scale, const at::Tensor& head_sums, float* out) {
  const int64_t vocab = head.size(0);
  if (head.scalar_type() == at::kFloat) {
    const float* w = head.data_ptr<float>();
    at::parallel_for(0, vocab, GRAIN, [&](int64_t b, int64_t e) {
      for (int64_t v = b; v < e; ++v) out[v] = f.dot(x, w + v * k, k);
    });
    return;
  }
  if (head.scalar_type() == at::kHalf) {
    const auto* w = reinterpret_cast<const uint16_t*>(head.data_ptr<at::Half>());
    at::parallel_for(0, vocab, GRAIN, [&](int64_t b, int64_t e) { f.half_rows(x, w, k, b, e, out); });
    return;
  }
  Tokens tokens(1, k);
  f.quantize(x, k, tokens.codes.data(), &tokens.scales[0]);
  std::vector<int32_t> sums(vocab);
  const int8_t* w = head.data_ptr<int8_t>();
  const int32_t* w_sums = head_sums.data_ptr<int32_t>();
  at::parallel_for(0, vocab, GRAIN, [&](int64_t b, int64_t e) {
    f.int8_rows(tokens.codes.data(), w, w_sums, k, b, e, sums.data());
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
// FFN sub-norm), weights/row_sums/scales[4l..4l+3] (q|k|v stacked, o, gate|up stacked, down;
// row_sums: each int8 row's sum of codes, unused for packed rows); norms[4L]
// is the final norm. Returns the logits (vocab,) in float32.
at::Tensor decode_step(int64_t token, int64_t position, const at::Tensor& embed,
                       at::TensorList norms, at::TensorList weights, at::TensorList row_sums,
                       at::TensorList scales,
                       const at::Tensor& head, const at::Tensor& head_scale,
                       const at::Tensor& head_sums, const at::Tensor& cos, const at::Tensor& sin,
                       at::TensorList keys, at::TensorList values, int64_t heads, double eps,
                       int64_t activation, int64_t path) {
  const Kernels& f = kernels_for(resolve_path(path));
  const int64_t layers = keys.size(), d = embed.size(1);
  check(layers > 0 && int64_t(values.size()) == layers && int64_t(norms.size()) == 4 * layers + 1 &&
        int64_t(weights.size()) == 4 * layers && int64_t(scales.size()) == 4 * layers &&
        int64_t(row_sums.size()) == 4 * layers,
        "one set of norms, weights and caches per layer");
  const int64_t kv_heads = keys[0].size(1), dim = keys[0].size(3);
  check(0 <= token && token < embed.size(0), "token id outside the vocabulary");
  check(0 <= position && position < cos.size(0), "position past the context");
  // The caches grow (nn/kv_cache.py): each layer's room is its own size(2), checked before
  // anything is written, so that a cache without room is an error, not a write past its end.
  for (int64_t l = 0; l < layers; ++l) {
    check(keys[l].dim() == 4 && keys[l].size(0) == 1 && keys[l].size(1) == kv_heads &&
              keys[l].size(3) == dim && keys[l].sizes() == values[l].sizes(),
          "caches of one sequence, (1, kv_heads, room, head_dim) in every layer");
    check(keys[l].scalar_type() == at::kFloat && values[l].scalar_type() == at::kFloat &&
              keys[l].is_contiguous() && values[l].is_contiguous(),
          "contiguous float32 caches");
    check(position < keys[l].size(2), "no room in the cache for the position");
  }
  check(heads * dim == d && heads % kv_heads == 0, "heads do not divide the hidden size");
  const int64_t kv = kv_heads * dim, ffn = norms[3].size(0);
  const float feps = float(eps);
  Stopwatch clock;

  std::vector<float> x(d);  // the token's embedding row, float32 or float16 (2B4T's bench)
  if (embed.scalar_type() == at::kHalf)
    std::copy_n(embed.data_ptr<at::Half>() + token * d, d, x.begin());
  else
    std::copy_n(embed.data_ptr<float>() + token * d, d, x.begin());
  std::vector<float> normed(std::max(d, ffn)), qkv(d + 2 * kv), attended(d), projected(d),
      gate_up(2 * ffn), hidden(ffn);
  const float* cos_row = cos.data_ptr<float>() + position * dim;
  const float* sin_row = sin.data_ptr<float>() + position * dim;
  for (int64_t l = 0; l < layers; ++l) {
    rms_norm(f, x.data(), norms[4 * l].data_ptr<float>(), d, feps, normed.data());
    clock.charge(REST);
    bit_linear(f, normed.data(), d, weights[4 * l], row_sums[4 * l], scales[4 * l],
               qkv.data());
    clock.charge(TERNARY);
    float* q = qkv.data();
    float* k = q + d;
    float* v = k + kv;
    rope(q, heads, dim, cos_row, sin_row);
    rope(k, kv_heads, dim, cos_row, sin_row);
    const int64_t ctx = keys[l].size(2);
    float* key_cache = keys[l].data_ptr<float>();
    float* value_cache = values[l].data_ptr<float>();
    for (int64_t h = 0; h < kv_heads; ++h) {
      std::copy_n(k + h * dim, dim, key_cache + (h * ctx + position) * dim);
      std::copy_n(v + h * dim, dim, value_cache + (h * ctx + position) * dim);
    }
    attend(f, q, key_cache, value_cache, heads, kv_heads, ctx, dim, position + 1, attended.data());
    clock.charge(ATTENTION);
    rms_norm(f, attended.data(), norms[4 * l + 1].data_ptr<float>(), d, feps, normed.data());
    clock.charge(REST);
    bit_linear(f, normed.data(), d, weights[4 * l + 1], row_sums[4 * l + 1], scales[4 * l + 1],
               projected.data());
    clock.charge(TERNARY);
    for (int64_t i = 0; i < d; ++i) x[i] += projected[i];

    rms_norm(f, x.data(), norms[4 * l + 2].data_ptr<float>(), d, feps, normed.data());
    clock.charge(REST);
    bit_linear(f, normed.data(), d, weights[4 * l + 2], row_sums[4 * l + 2], scales[4 * l + 2],
               gate_up.data());
    clock.charge(TERNARY);
    for (int64_t i = 0; i < ffn; ++i) {
      const float g = gate_up[i];
      const float gated = activation == RELU2 ? std::max(g, 0.0f) * std::max(g, 0.0f)
                                              : g / (1.0f + std::exp(-g));
      hidden[i] = gated * gate_up[ffn + i];
    }
    rms_norm(f, hidden.data(), norms[4 * l + 3].data_ptr<float>(), ffn, feps, normed.data());
    clock.charge(REST);
    bit_linear(f, normed.data(), ffn, weights[4 * l + 3], row_sums[4 * l + 3],
               scales[4 * l + 3], projected.data());
    clock.charge(TERNARY);
    for (int64_t i = 0; i < d; ++i) x[i] += projected[i];
  }
  rms_norm(f, x.data(), norms[4 * layers].data_ptr<float>(), d, feps, normed.data());
  auto logits = at::empty({head.size(0)}, at::kFloat);
  clock.charge(REST);
  head_logits(f, normed.data(), d, head, head_scale, head_sums, logits.data_ptr<float>());
  clock.charge(HEAD);
  ++profile.steps;
  return logits;
}

// Where the fused steps' time went since the last call: seconds of ternary sums (each
// projection's quantizing, sums and rescale), head, attention (RoPE, the cache, attention) and
// the rest (norms, residuals, the gate), then the number of steps; and starts again.
std::vector<double> step_profile() {
  std::vector<double> out(profile.seconds, profile.seconds + PARTS);
  out.push_back(double(profile.steps));
  profile = Profile();
  return out;
}

TORCH_LIBRARY_FRAGMENT(bitnet_ternary, m) {
  m.def("decode_step(int token, int position, Tensor embed, Tensor[] norms, Tensor[] weights, "
        "Tensor[] row_sums, Tensor[] scales, Tensor head, Tensor head_scale, Tensor head_sums, "
        "Tensor cos, Tensor sin, Tensor[] keys, Tensor[] values, int heads, float eps, int activation, "
        "int isa) -> Tensor");
  m.def("step_profile() -> float[]", &step_profile);
}

TORCH_LIBRARY_IMPL(bitnet_ternary, CPU, m) { m.impl("decode_step", &decode_step); }
