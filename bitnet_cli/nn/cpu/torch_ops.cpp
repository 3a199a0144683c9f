// The kernel's ops as torch sees them (torch.ops.bitnet_ternary.*): tensors checked and unpacked,
// the plain arithmetic of kernels.h run on torch's threads (at::parallel_for: the pool that
// torch.set_num_threads governs). decode_step.cpp adds the fused step.
//
// Only ATen's core and the op registry are included (not torch/extension.h): the build takes a
// few seconds instead of half a minute.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <memory>
#include <numeric>
#include <string>

#include "glue.h"

namespace bitnet {

void check_packed(const at::Tensor& packed, int64_t k) {
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte && packed.is_contiguous(),
              "packed must be contiguous 2-d uint8");
  TORCH_CHECK(packed.size(1) * 4 == padded(k), "packed rows do not hold ", k, " weights");
}

Tokens quantize(const Kernels& f, const float* x, int64_t m, int64_t k) {
  Tokens tokens(m, k);
  at::parallel_for(0, m, 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      tokens.sums[t] = f.quantize(x + t * k, k, tokens.codes.data() + t * tokens.kp,
                                  &tokens.scales[t]);
  });
  return tokens;
}

namespace {

// Rows begin..end of the int32 sums (m, n), which sit in out's own memory, rescaled in place.
void rescale(const Tokens& x, const float* scale, int64_t n, int64_t begin, int64_t end,
             float* out) {
  static_assert(sizeof(float) == sizeof(int32_t), "sums share the output's memory");
  const int32_t* sums = reinterpret_cast<const int32_t*>(out);
  for (int64_t t = 0; t < x.m; ++t)
    for (int64_t r = begin; r < end; ++r)
      out[t * n + r] = float(sums[t * n + r]) / (x.scales[t] * scale[r]);
}

}  // namespace

// The int32 sums first, in the output's own memory, then each rescaled in place by the thread
// that summed it (rescaling a batch's outputs on one thread took a third of its projections'
// time on two). The int8 engine's rows go through the same int8 rows as the head (oneDNN's int8
// GEMM behind torch._int_mm was 5x slower on AVX2 at one token).
void bit_linear(const Kernels& f, const float* x, int64_t m, int64_t k, const at::Tensor& weight,
                const at::Tensor& row_sums, const float* scale, float* out) {
  const int64_t n = weight.size(0);
  const Tokens tokens = quantize(f, x, m, k);
  int32_t* sums = reinterpret_cast<int32_t*>(out);
  if (weight.scalar_type() == at::kByte) {
    ternary_sums(f, tokens, weight, sums, [&](int64_t begin, int64_t end) {
      rescale(tokens, scale, n, begin, end, out);
    });
    return;
  }
  const int8_t* w = weight.data_ptr<int8_t>();
  const int32_t* w_sums = row_sums.data_ptr<int32_t>();
  at::parallel_for(0, n, GRAIN, [&](int64_t begin, int64_t end) {
    f.int8_rows(tokens.codes.data(), m, tokens.kp, w, w_sums, k, begin, end, sums, n);
    rescale(tokens, scale, n, begin, end, out);
  });
}

}  // namespace bitnet

using namespace bitnet;

// Rows laid out in portable.cpp's layout by `lay` (pack or repack) on torch's threads.
template <class Lay>
at::Tensor laid_out(int64_t n, int64_t k, Lay lay, const char* what) {
  auto packed = at::zeros({n, padded(k) / 4}, at::kByte);
  uint8_t* out = packed.data_ptr<uint8_t>();
  std::atomic<bool> fine{true};
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    if (!lay(begin, end, out)) fine = false;
  });
  TORCH_CHECK(fine, what);
  return packed;
}

// codes: (out, in) int8 in {-1, 0, 1} -> (out, padded(in) / 4) uint8 in portable.cpp's layout.
at::Tensor pack_codes(const at::Tensor& codes) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kChar, "pack wants 2-d int8 codes");
  const auto c = codes.contiguous();
  const int8_t* from = c.data_ptr<int8_t>();
  const int64_t n = c.size(0), k = c.size(1);
  return laid_out(n, k, [&](int64_t b, int64_t e, uint8_t* out) {
    return pack(from, n, k, b, e, out);
  }, "ternary codes must be -1, 0 or 1");
}

// released: (out / 4, in) uint8, the 2B4T checkpoint's packed codes -> the same as pack_codes.
at::Tensor repack_released(const at::Tensor& released) {
  TORCH_CHECK(released.dim() == 2 && released.scalar_type() == at::kByte,
              "repack wants 2-d uint8 packed codes");
  const auto r = released.contiguous();
  const uint8_t* from = r.data_ptr<uint8_t>();
  const int64_t n = 4 * r.size(0), k = r.size(1);
  return laid_out(n, k, [&](int64_t b, int64_t e, uint8_t* out) {
    return repack(from, n, k, b, e, out);
  }, "packed ternary codes must be 0, 1 or 2 (a code + 1)");
}

// x: (m, in) int8 codes; packed: (out, padded(in) / 4) -> (m, out) int32, exactly x @ codes.T.
at::Tensor ternary_mm(const at::Tensor& x, const at::Tensor& packed, int64_t path) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kChar, "x must be 2-d int8");
  const auto xc = x.contiguous();
  const int64_t m = xc.size(0), k = xc.size(1), n = packed.size(0);
  check_packed(packed, k);
  Tokens tokens(m, k);
  const int8_t* xd = xc.data_ptr<int8_t>();
  for (int64_t t = 0; t < m; ++t)
    for (int64_t i = 0; i < k; ++i) {
      tokens.codes[t * tokens.kp + i] = xd[t * k + i];
      tokens.sums[t] += xd[t * k + i];
    }
  auto out = at::empty({m, n}, at::kInt);
  ternary_sums(kernels_for(resolve_path(path)), tokens, packed, out.data_ptr<int32_t>(),
               [](int64_t, int64_t) {});
  return out;
}

// The whole BitLinear at inference in one call (bit_linear, glue.h): x (m, in) float32 against
// the packed rows -> (m, out) float32, the int8 engine's outputs to the bit (built without
// -ffast-math or FMA contraction).
at::Tensor ternary_linear(const at::Tensor& x, const at::Tensor& packed,
                          const at::Tensor& w_scale, int64_t path) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be 2-d float32");
  TORCH_CHECK(w_scale.dim() == 1 && w_scale.scalar_type() == at::kFloat &&
              w_scale.size(0) == packed.size(0), "one float32 scale per packed row");
  const auto xc = x.contiguous();
  const auto ws = w_scale.contiguous();
  const int64_t m = xc.size(0), k = xc.size(1), n = packed.size(0);
  check_packed(packed, k);
  auto out = at::empty({m, n}, at::kFloat);
  bit_linear(kernels_for(resolve_path(path)), xc.data_ptr<float>(), m, k, packed, at::Tensor(),
             ws.data_ptr<float>(), out.data_ptr<float>());
  return out;
}

// x: (m, in) int8 codes in [-127, 127]; codes: (out, in) int8 -> (m, out) int32, exactly
// x @ codes.T (the per-op int8 head: torch._int_mm is not exact for full-range int8 codes on
// every CPU).
at::Tensor int8_mm(const at::Tensor& x, const at::Tensor& codes, int64_t path) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kChar && codes.dim() == 2 &&
              codes.scalar_type() == at::kChar && x.size(1) == codes.size(1),
              "int8_mm wants int8 (m, k) and (n, k)");
  const Int8Rows rows = kernels_for(resolve_path(path)).int8_rows;
  const auto xc = x.contiguous(), wc = codes.contiguous();
  const int64_t m = xc.size(0), k = xc.size(1), n = wc.size(0);
  const int8_t* w = wc.data_ptr<int8_t>();
  // Each row's sum of codes, row by row (at::sum widens the whole table to int32 first: 1.3 GB
  // at 2B4T's head).
  std::vector<int32_t> w_sums(n);
  at::parallel_for(0, n, GRAIN, [&](int64_t b, int64_t e) {
    for (int64_t v = b; v < e; ++v)
      w_sums[v] = std::accumulate(w + v * k, w + (v + 1) * k, int32_t(0));
  });
  auto out = at::empty({m, n}, at::kInt);
  at::parallel_for(0, n, GRAIN, [&](int64_t b, int64_t e) {
    rows(xc.data_ptr<int8_t>(), m, k, w, w_sums.data(), k, b, e, out.data_ptr<int32_t>(), n);
  });
  return out;
}

// x: (m, in) float32; w: (out, in) float16 -> (m, out) float32: the float16 head for a few rows
// (the per-op path's prompt and tokens), summed in float32 exactly as the fused step's head,
// each row read from memory once for all of them.
at::Tensor half_linear(const at::Tensor& x, const at::Tensor& w, int64_t path) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && w.dim() == 2 &&
              w.scalar_type() == at::kHalf && x.size(1) == w.size(1),
              "half_linear wants float32 (m, k) and float16 (n, k)");
  const HalfRows rows = kernels_for(resolve_path(path)).half_rows;
  const auto xc = x.contiguous(), wc = w.contiguous();
  const int64_t m = xc.size(0), k = xc.size(1), n = wc.size(0);
  const auto* bits = reinterpret_cast<const uint16_t*>(wc.data_ptr<at::Half>());
  auto out = at::empty({m, n}, at::kFloat);
  at::parallel_for(0, n, GRAIN, [&](int64_t b, int64_t e) {
    rows(xc.data_ptr<float>(), m, bits, k, b, e, out.data_ptr<float>(), n);
  });
  return out;
}

// The machine's read bandwidth in bytes/s as the engines could reach it: a buffer of `megabytes`
// (far past the caches) read with the path's widest loads by every one of torch's threads, each
// its own contiguous share (first touched by that thread, so its pages are near it), the best
// of `repeats` passes.
double read_bandwidth(int64_t megabytes, int64_t repeats, int64_t path) {
  TORCH_CHECK(megabytes > 0 && repeats > 0, "read_bandwidth wants a size and a count");
  const Kernels& f = kernels_for(resolve_path(path));
  constexpr int64_t CHUNK = 1 << 20;
  const int64_t chunks = megabytes, bytes = chunks * CHUNK;
  std::unique_ptr<uint8_t, decltype(&std::free)> buffer(
      static_cast<uint8_t*>(std::aligned_alloc(64, bytes)), &std::free);
  TORCH_CHECK(buffer, "no memory for a ", megabytes, " MB read");
  uint8_t* data = buffer.get();
  at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c)
      for (int64_t i = 0; i < CHUNK; ++i) data[c * CHUNK + i] = uint8_t(c * 31 + i);
  });
  std::vector<uint64_t> folded(chunks);
  double best = 0.0;
  for (int64_t pass = 0; pass < repeats; ++pass) {
    const auto start = std::chrono::steady_clock::now();
    at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
      for (int64_t c = b; c < e; ++c) folded[c] = f.read(data + c * CHUNK, CHUNK);
    });
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    best = std::max(best, double(bytes) / seconds);
  }
  static volatile uint64_t sink;  // the reads' result is used, so none is optimized away
  for (uint64_t value : folded) sink = sink ^ value;
  return best;
}

std::vector<int64_t> isas() {
  std::vector<int64_t> found;
  for (int64_t path = LAST_PATH; path >= PORTABLE; --path)
    if (supports(path)) found.push_back(path);
  return found;
}

void limit_to(int64_t path) {
  TORCH_CHECK(path >= PORTABLE && path <= LAST_PATH, "no kernel path ", path);
  limit_paths(path);
}

std::string name_of(int64_t path) { return path_name(path); }

// Whether at::parallel_for spreads the kernel over torch's threads: with ATen's OpenMP backend
// only when this build had OpenMP (kernel_build.py), with its native pool always.
bool threaded() {
#if AT_PARALLEL_OPENMP && !defined(_OPENMP)
  return false;
#else
  return true;
#endif
}

TORCH_LIBRARY(bitnet_ternary, m) {
  m.def("pack(Tensor codes) -> Tensor");  // ternary codes -> 2-bit blocks
  m.def("repack(Tensor released) -> Tensor");  // the 2B4T layout -> 2-bit blocks
  m.def("ternary_mm(Tensor x, Tensor packed, int isa) -> Tensor");  // exact int32 sums
  m.def("ternary_linear(Tensor x, Tensor packed, Tensor scale, int isa) -> Tensor");
  m.def("half_linear(Tensor x, Tensor w, int isa) -> Tensor");  // the float16 head, float32 sums
  m.def("int8_mm(Tensor x, Tensor codes, int isa) -> Tensor");  // the int8 head's exact sums
  // The kernel paths this CPU runs, fastest first, up to the limit set by limit_paths
  // (kernel.py: the best path that passes its checks), and each one's name ("" past the last).
  m.def("isas() -> int[]", &isas);
  m.def("limit_paths(int isa) -> ()", &limit_to);
  m.def("path_name(int isa) -> str", &name_of);
  m.def("read_bandwidth(int megabytes, int repeats, int isa) -> float", &read_bandwidth);
  m.def("threaded() -> bool", &threaded);
}

TORCH_LIBRARY_IMPL(bitnet_ternary, CPU, m) {
  m.impl("pack", &pack_codes);
  m.impl("repack", &repack_released);
  m.impl("ternary_mm", &ternary_mm);
  m.impl("ternary_linear", &ternary_linear);
  m.impl("int8_mm", &int8_mm);
  m.impl("half_linear", &half_linear);
}
