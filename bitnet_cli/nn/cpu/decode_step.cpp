// Tokens through the whole model in one call: the 2bit (and int8) engines' decode step, without
// the hundreds of small torch ops (and their dispatch) that a token costs in eager PyTorch.
// decode_batch takes one new token of each of several sequences, each with its own caches and
// position (a server's continuous batching); decode_step is the batch of one. nn/fused_decode.py
// gathers the model's tensors and calls them for every new token.
//
// The ternary projections are the exact sums the engines compute anywhere (2-bit packed rows
// through kernels.h's tiles, or int8 rows through its int8 rows), rescaled as BitLinear does.
// The float work around them (RMSNorm, RoPE, attention, the gate, the head) is computed here in
// float32 in loops.h's one order, the same on every path: the logits differ from the per-op
// path's in the last bits, and equal themselves on every CPU and path; the 2bit and int8
// engines share this code, so theirs equal each other's to the bit. A token's float operations
// are the same whatever else is in its batch (each token's own sums, each sequence's own
// attention), so its logits in a batch are its logits alone, to the bit; the batch shares the
// reading of the weights, which is what a lone token's step waits on.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <chrono>
#include <cmath>
#include <cstring>

#include "glue.h"

namespace bitnet {
namespace {

// The gates' numbers: the order of config.ACTIVATIONS ("relu2", "silu").
constexpr int64_t RELU2 = 0;

// Bytes of the float32 head's rows that each thread reads for every token of a batch before the
// next rows: they stay in its L1 meanwhile, so memory is read once for the whole batch (the
// float16 head and the int8 rows take several tokens per row load themselves: kernels.h).
constexpr int64_t SHARED_BYTES = 32 * 1024;

// Where the steps' time went since step_profile last asked: seconds per part, and the tokens.
enum Part { TERNARY, HEAD, ATTENTION, REST, PARTS };
struct Profile {
  double seconds[PARTS] = {};
  int64_t tokens = 0;
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

// Rows 0..n of a weight (row_bytes each) against each of m tokens: fn(t, begin, end) for token t
// and rows begin..end. The rows are spread over threads, and each thread takes its share a block
// of SHARED_BYTES at a time, every token reading the block before the next one is loaded.
template <class Fn>
void in_row_blocks(int64_t n, int64_t row_bytes, int64_t m, const Fn& fn) {
  const int64_t block = m == 1 ? n : std::max(ROWS, SHARED_BYTES / row_bytes / ROWS * ROWS);
  at::parallel_for(0, n, GRAIN, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; b += block)
      for (int64_t t = 0; t < m; ++t) fn(t, b, std::min(end, b + block));
  });
}

// out = weight * (x / sqrt(mean(x^2) + eps)), for each of m rows of n.
void rms_norm(const Kernels& f, const float* x, int64_t m, const float* weight, int64_t n,
              float eps, float* out) {
  for (int64_t t = 0; t < m; ++t) {
    const float* xt = x + t * n;
    const float inv = 1.0f / std::sqrt(f.dot(xt, xt, n) / float(n) + eps);
    for (int64_t i = 0; i < n; ++i) out[t * n + i] = weight[i] * (xt[i] * inv);
  }
}

// std::max(x, 0.0f) squared, to the bit, in integer operations: a float compare may trap (on a
// NaN, under the default -ftrapping-math), so the compiler kept relu2's loop scalar, with a
// branch that random signs mispredicted half the time (0.1 ms of a lone 95M step, eight times
// that in a batch of eight). A negative number's sign and bits are cleared (-0 becomes +0: the
// same square), a NaN is kept as std::max keeps it.
float relu_squared(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  const uint32_t negative = uint32_t(int32_t(bits) >> 31);
  const uint32_t nan = uint32_t(int32_t(0x7f800000u - (bits & 0x7fffffffu)) >> 31);
  bits &= ~(negative & ~nan);
  float g;
  std::memcpy(&g, &bits, 4);
  return g * g;
}

// The FFN's gate at one token: activation(gate) * up, gate_up holding gate then up (ffn each).
void gate(const float* gate_up, int64_t ffn, int64_t activation, float* hidden) {
  const float* up = gate_up + ffn;
  if (activation == RELU2) {
    for (int64_t i = 0; i < ffn; ++i) hidden[i] = relu_squared(gate_up[i]) * up[i];
  } else {
    for (int64_t i = 0; i < ffn; ++i) {
      const float g = gate_up[i];
      hidden[i] = g / (1.0f + std::exp(-g)) * up[i];
    }
  }
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

// A cache's rows are read one position after another, but only a few kilobytes of them per head,
// too short a stream for the CPU's prefetchers: ask for the row AHEAD positions on while this one
// is summed. A batch's caches are past L2 (a lone step's often fit).
constexpr int64_t AHEAD = 8;
void ask_ahead(const float* rows, int64_t j, int64_t length, int64_t dim) {
  if (j + AHEAD >= length) return;
  const char* row = reinterpret_cast<const char*>(rows + (j + AHEAD) * dim);
  for (int64_t byte = 0; byte < dim * 4; byte += 64) __builtin_prefetch(row + byte);
}

// One query head's causal attention over positions 0..length-1 of its key/value head (keys,
// values: ctx x dim each, positions past length never read); scores holds length floats.
void attend(const Kernels& f, const float* q, const float* keys, const float* values,
            int64_t dim, int64_t length, float* scores, float* out) {
  const float scale = 1.0f / std::sqrt(float(dim));
  float most = -INFINITY;
  for (int64_t j = 0; j < length; ++j) {
    ask_ahead(keys, j, length, dim);
    scores[j] = f.dot(q, keys + j * dim, dim) * scale;
    most = std::max(most, scores[j]);
  }
  float total = 0.0f;
  for (int64_t j = 0; j < length; ++j) total += scores[j] = std::exp(scores[j] - most);
  std::fill_n(out, dim, 0.0f);
  for (int64_t j = 0; j < length; ++j) {
    ask_ahead(values, j, length, dim);
    f.add_scaled(out, scores[j] / total, values + j * dim, dim);
  }
}

// The output layer at m tokens, x (m, k) -> out (m, vocab): float32 or float16 rows (head_sums
// undefined), or int8 rows with one scale each and their sums of codes, quantized and rescaled
// as Int8Linear does. Each row's sum is the same in any batch.
void head_logits(const Kernels& f, const float* x, int64_t m, int64_t k, const at::Tensor& head,
                 const at::Tensor& scale, const at::Tensor& head_sums, float* out) {
  const int64_t vocab = head.size(0);
  if (head.scalar_type() == at::kFloat) {
    const float* w = head.data_ptr<float>();
    in_row_blocks(vocab, 4 * k, m, [&](int64_t t, int64_t b, int64_t e) {
      for (int64_t v = b; v < e; ++v) out[t * vocab + v] = f.dot(x + t * k, w + v * k, k);
    });
    return;
  }
  if (head.scalar_type() == at::kHalf) {
    const auto* w = reinterpret_cast<const uint16_t*>(head.data_ptr<at::Half>());
    at::parallel_for(0, vocab, GRAIN, [&](int64_t b, int64_t e) {
      f.half_rows(x, m, w, k, b, e, out, vocab);
    });
    return;
  }
  const Tokens tokens = quantize(f, x, m, k);
  std::vector<int32_t> sums(m * vocab);
  const int8_t* w = head.data_ptr<int8_t>();
  const int32_t* w_sums = head_sums.data_ptr<int32_t>();
  at::parallel_for(0, vocab, GRAIN, [&](int64_t b, int64_t e) {
    f.int8_rows(tokens.codes.data(), m, tokens.kp, w, w_sums, k, b, e, sums.data(), vocab);
  });
  const float* s = scale.data_ptr<float>();
  for (int64_t t = 0; t < m; ++t)
    for (int64_t v = 0; v < vocab; ++v)
      out[t * vocab + v] = float(sums[t * vocab + v]) / (tokens.scales[t] * s[v]);
}

// The model's tensors, as FusedDecode gathers them. Per layer l: norms[4l..4l+3] (input,
// attention sub-norm, post-attention, FFN sub-norm), weights/row_sums/scales[4l..4l+3] (q|k|v
// stacked, o, gate|up stacked, down; row_sums: each int8 row's sum of codes, unused for packed
// rows); norms[4L] is the final norm.
struct Model {
  const at::Tensor& embed;
  at::TensorList norms, weights, row_sums, scales;
  const at::Tensor &head, &head_scale, &head_sums, &cos, &sin;
  int64_t heads;
  float eps;
  int64_t activation;
};

// The sequences: each one's new token, its position, and its caches, sequence-major
// (keys[s * layers + l]: sequence s's layer l, (1, kv_heads, room, head_dim)).
struct Batch {
  const char* op;  // named in errors, with the sequence where there can be several
  bool several;
  at::IntArrayRef tokens, positions;
  at::TensorList keys, values;
};

// The sizes that the checks vouch for.
struct Shape {
  int64_t m, layers, d, kv_heads, dim, kv, ffn;
};

// A failed check is an error naming the op (and the sequence), raised before anything is
// written: a cache without room is an error, not a write past its end.
void check(const Batch& batch, bool ok, const char* what, int64_t sequence = -1) {
  if (ok) return;
  if (sequence < 0 || !batch.several) TORCH_CHECK(false, batch.op, ": ", what);
  TORCH_CHECK(false, batch.op, ": ", what, " (sequence ", sequence, ")");
}

Shape checked(const Model& model, const Batch& batch) {
  const int64_t m = batch.tokens.size();
  check(batch, m > 0 && int64_t(batch.positions.size()) == m,
        "one position for each token, and at least one token");
  check(batch, int64_t(batch.keys.size()) % m == 0 && batch.values.size() == batch.keys.size(),
        "the same number of caches for every sequence");
  const int64_t layers = int64_t(batch.keys.size()) / m, d = model.embed.size(1);
  check(batch, layers > 0 && int64_t(model.norms.size()) == 4 * layers + 1 &&
        int64_t(model.weights.size()) == 4 * layers && int64_t(model.scales.size()) == 4 * layers &&
        int64_t(model.row_sums.size()) == 4 * layers,
        "one set of norms, weights and caches per layer");
  const int64_t kv_heads = batch.keys[0].size(1), dim = batch.keys[0].size(3);
  for (int64_t s = 0; s < m; ++s) {
    const int64_t position = batch.positions[s];
    check(batch, 0 <= batch.tokens[s] && batch.tokens[s] < model.embed.size(0),
          "token id outside the vocabulary", s);
    check(batch, 0 <= position && position < model.cos.size(0), "position past the context", s);
    // The caches grow (nn/kv_cache.py): each layer's room is its own size(2).
    for (int64_t l = 0; l < layers; ++l) {
      const at::Tensor &keys = batch.keys[s * layers + l], &values = batch.values[s * layers + l];
      check(batch, keys.dim() == 4 && keys.size(0) == 1 && keys.size(1) == kv_heads &&
                keys.size(3) == dim && keys.sizes() == values.sizes(),
            "caches of one sequence, (1, kv_heads, room, head_dim) in every layer", s);
      check(batch, keys.scalar_type() == at::kFloat && values.scalar_type() == at::kFloat &&
                keys.is_contiguous() && values.is_contiguous(),
            "contiguous float32 caches", s);
      check(batch, position < keys.size(2), "no room in the cache for the position", s);
    }
  }
  check(batch, model.heads * dim == d && kv_heads > 0 && model.heads % kv_heads == 0,
        "heads do not divide the hidden size");
  return {m, layers, d, kv_heads, dim, kv_heads * dim, model.norms[3].size(0)};
}

// One call's work: every token through every layer, then the head. Buffers hold one row per
// token (token t's at t * width).
class Decoder {
 public:
  Decoder(const Kernels& f, const Model& model, const Batch& batch, const Shape& shape)
      : f_(f), model_(model), batch_(batch), s_(shape), x_(s_.m * s_.d),
        normed_(s_.m * std::max(s_.d, s_.ffn)), qkv_(s_.m * (s_.d + 2 * s_.kv)),
        attended_(s_.m * s_.d), projected_(s_.m * s_.d), gate_up_(s_.m * 2 * s_.ffn),
        hidden_(s_.m * s_.ffn) {}

  at::Tensor run() {
    const at::Tensor& embed = model_.embed;  // float32, or float16 (2B4T's bench)
    for (int64_t t = 0; t < s_.m; ++t) {
      const int64_t row = batch_.tokens[t] * s_.d;
      if (embed.scalar_type() == at::kHalf)
        std::copy_n(embed.data_ptr<at::Half>() + row, s_.d, x_.begin() + t * s_.d);
      else
        std::copy_n(embed.data_ptr<float>() + row, s_.d, x_.begin() + t * s_.d);
    }
    for (int64_t l = 0; l < s_.layers; ++l) layer(l);
    norm(x_, 4 * s_.layers, s_.d);
    auto logits = at::empty({s_.m, model_.head.size(0)}, at::kFloat);
    clock_.charge(REST);
    head_logits(f_, normed_.data(), s_.m, s_.d, model_.head, model_.head_scale,
                model_.head_sums, logits.data_ptr<float>());
    clock_.charge(HEAD);
    profile.tokens += s_.m;
    return logits;
  }

 private:
  void norm(const std::vector<float>& x, int64_t which, int64_t n) {
    rms_norm(f_, x.data(), s_.m, model_.norms[which].data_ptr<float>(), n, model_.eps,
             normed_.data());
  }

  // normed_ (m, k) through weights[which] into out.
  void project(int64_t which, int64_t k, std::vector<float>& out) {
    clock_.charge(REST);
    bit_linear(f_, normed_.data(), s_.m, k, model_.weights[which], model_.row_sums[which],
               model_.scales[which].data_ptr<float>(), out.data());
    clock_.charge(TERNARY);
  }

  void layer(int64_t l) {
    const int64_t d = s_.d, ffn = s_.ffn;
    norm(x_, 4 * l, d);
    project(4 * l, d, qkv_);
    attention(l);
    clock_.charge(ATTENTION);
    norm(attended_, 4 * l + 1, d);
    project(4 * l + 1, d, projected_);
    for (int64_t i = 0; i < s_.m * d; ++i) x_[i] += projected_[i];

    norm(x_, 4 * l + 2, d);
    project(4 * l + 2, d, gate_up_);
    for (int64_t t = 0; t < s_.m; ++t)
      gate(gate_up_.data() + t * 2 * ffn, ffn, model_.activation, hidden_.data() + t * ffn);
    norm(hidden_, 4 * l + 3, ffn);
    project(4 * l + 3, ffn, projected_);
    for (int64_t i = 0; i < s_.m * d; ++i) x_[i] += projected_[i];
  }

  // Layer l's attention: each sequence's query and key rotated at its position, its key and
  // value written into its own cache there, then every query head's causal attention over its
  // sequence's positions 0..position, reading its group's key/value head (grouped-query
  // attention); the (sequence, head) pairs are spread over threads.
  void attention(int64_t l) {
    const int64_t d = s_.d, dim = s_.dim, heads = model_.heads, width = d + 2 * s_.kv;
    for (int64_t t = 0; t < s_.m; ++t) {
      float* q = qkv_.data() + t * width;
      float* k = q + d;
      float* v = k + s_.kv;
      const int64_t position = batch_.positions[t], ctx = keys(t, l).size(2);
      const float* cos_row = model_.cos.data_ptr<float>() + position * dim;
      const float* sin_row = model_.sin.data_ptr<float>() + position * dim;
      rope(q, heads, dim, cos_row, sin_row);
      rope(k, s_.kv_heads, dim, cos_row, sin_row);
      for (int64_t h = 0; h < s_.kv_heads; ++h) {
        std::copy_n(k + h * dim, dim, keys(t, l).data_ptr<float>() + (h * ctx + position) * dim);
        std::copy_n(v + h * dim, dim, values(t, l).data_ptr<float>() + (h * ctx + position) * dim);
      }
    }
    const int64_t group = heads / s_.kv_heads;
    at::parallel_for(0, s_.m * heads, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scores;
      for (int64_t i = begin; i < end; ++i) {
        const int64_t t = i / heads, h = i % heads, length = batch_.positions[t] + 1;
        const int64_t kv_offset = (h / group) * keys(t, l).size(2) * dim;
        scores.resize(length);
        attend(f_, qkv_.data() + t * width + h * dim, keys(t, l).data_ptr<float>() + kv_offset,
               values(t, l).data_ptr<float>() + kv_offset, dim, length, scores.data(),
               attended_.data() + t * d + h * dim);
      }
    });
  }

  const at::Tensor& keys(int64_t t, int64_t l) const { return batch_.keys[t * s_.layers + l]; }
  const at::Tensor& values(int64_t t, int64_t l) const {
    return batch_.values[t * s_.layers + l];
  }

  const Kernels& f_;
  const Model& model_;
  const Batch& batch_;
  const Shape s_;
  Stopwatch clock_;
  std::vector<float> x_, normed_, qkv_, attended_, projected_, gate_up_, hidden_;
};

at::Tensor decode(const Model& model, const Batch& batch, int64_t path) {
  const Kernels& f = kernels_for(resolve_path(path));
  const Shape shape = checked(model, batch);
  return Decoder(f, model, batch, shape).run();
}

}  // namespace
}  // namespace bitnet

using namespace bitnet;

// Token `token` at `position` through every layer; its keys and values are written into the
// caches (one per layer) at `position`. The model's tensors as Model says. Returns the logits
// (vocab,) in float32.
at::Tensor decode_step(int64_t token, int64_t position, const at::Tensor& embed,
                       at::TensorList norms, at::TensorList weights, at::TensorList row_sums,
                       at::TensorList scales, const at::Tensor& head, const at::Tensor& head_scale,
                       const at::Tensor& head_sums, const at::Tensor& cos, const at::Tensor& sin,
                       at::TensorList keys, at::TensorList values, int64_t heads, double eps,
                       int64_t activation, int64_t path) {
  const Model model{embed, norms, weights, row_sums, scales, head, head_scale, head_sums,
                    cos, sin, heads, float(eps), activation};
  const at::Tensor logits = decode(model, {"decode_step", false, token, position, keys, values},
                                   path);
  return logits.view({logits.size(1)});
}

// tokens[s] of sequence s at positions[s], for each sequence of the batch, through every layer;
// each one's keys and values are written into its own caches (keys[s * layers + l]) at its
// position. Returns the logits (m, vocab) in float32, row s sequence s's as decode_step gives
// them alone.
at::Tensor decode_batch(at::IntArrayRef tokens, at::IntArrayRef positions,
                        const at::Tensor& embed, at::TensorList norms, at::TensorList weights,
                        at::TensorList row_sums, at::TensorList scales, const at::Tensor& head,
                        const at::Tensor& head_scale, const at::Tensor& head_sums,
                        const at::Tensor& cos, const at::Tensor& sin, at::TensorList keys,
                        at::TensorList values, int64_t heads, double eps, int64_t activation,
                        int64_t path) {
  const Model model{embed, norms, weights, row_sums, scales, head, head_scale, head_sums,
                    cos, sin, heads, float(eps), activation};
  return decode(model, {"decode_batch", true, tokens, positions, keys, values}, path);
}

// Where the fused steps' time went since the last call: seconds of ternary sums (each
// projection's quantizing, sums and rescale), head, attention (RoPE, the cache, attention) and
// the rest (norms, residuals, the gate), then the number of tokens decoded (a batch's each); and
// starts again.
std::vector<double> step_profile() {
  std::vector<double> out(profile.seconds, profile.seconds + PARTS);
  out.push_back(double(profile.tokens));
  profile = Profile();
  return out;
}

TORCH_LIBRARY_FRAGMENT(bitnet_ternary, m) {
  m.def("decode_step(int token, int position, Tensor embed, Tensor[] norms, Tensor[] weights, "
        "Tensor[] row_sums, Tensor[] scales, Tensor head, Tensor head_scale, Tensor head_sums, "
        "Tensor cos, Tensor sin, Tensor[] keys, Tensor[] values, int heads, float eps, int activation, "
        "int isa) -> Tensor");
  m.def("decode_batch(int[] tokens, int[] positions, Tensor embed, Tensor[] norms, "
        "Tensor[] weights, Tensor[] row_sums, Tensor[] scales, Tensor head, Tensor head_scale, "
        "Tensor head_sums, Tensor cos, Tensor sin, Tensor[] keys, Tensor[] values, int heads, "
        "float eps, int activation, int isa) -> Tensor");
  m.def("step_profile() -> float[]", &step_profile);
}

TORCH_LIBRARY_IMPL(bitnet_ternary, CPU, m) {
  m.impl("decode_step", &decode_step);
  m.impl("decode_batch", &decode_batch);
}
