// RMSNorm on CPU: one pass over the activations forward, one backward, weight gradient included.
//
// Reference: saferlhf.algorithms.layers.rms_norm (transformers' LlamaRMSNorm; DESIGN §4).
//
// Notation: N rows (the leading dimensions flattened), H the hidden size, w the (H,) weight, x one
// row, dy its upstream gradient.
//
//   forward:   r = 1 / sqrt(mean(x²) + eps),   x̂ = x·r,   y = w · round(x̂)
//   backward:  g = dy·w,   dx = r · (g − x̂ · mean(g·x̂)),   dw = Σ_rows dy · round(x̂)
//
// `round` is the rounding to the activations' dtype that the reference does before the weight
// multiply (nothing for float32). The forward keeps r, one float32 per row, for the backward.
//
// Rows run in parallel (at::parallel_for: torch's OpenMP runtime, the extension is built with
// -fopenmp); a row (H ≤ a few thousand) stays in L1 between its two `omp simd` loops. The weight
// gradient is a sum over rows, so the backward cuts the rows into at most kMaxBlocks contiguous
// blocks, each with its own float32 partial sum of dw (no atomics, no races), and adds the partial
// sums up at the end. The blocks depend on N and H only, not on the thread count, so dw is the same
// however many threads ran. Activations may be float32, bfloat16 or float16 (weight and gradients
// of the same dtype); all arithmetic is float32.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

namespace {

// Elements of work below which a parallel region costs more than it saves (ATen uses the same).
constexpr int64_t kGrainElements = 32768;

// Most row blocks of the backward, each with an (H,) float32 partial sum of dw: more than the
// threads of any CPU this runs on, and few enough that adding the partial sums costs little.
constexpr int64_t kMaxBlocks = 64;

// Loads and stores of one element as float32, rounding to nearest even as c10's conversions do.
// The 16-bit types go through their bits with selects instead of branches (c10::Half's conversion
// does not vectorise), so that every loop over them does.
template <typename scalar_t>
struct Element {
  using raw = scalar_t;  // float32
  static float load(scalar_t v) { return v; }
  static scalar_t store(float v) { return v; }
};

template <>
struct Element<c10::BFloat16> {
  using raw = uint16_t;
  static float load(uint16_t bits) { return __builtin_bit_cast(float, static_cast<uint32_t>(bits) << 16); }
  static uint16_t store(float v) {
    const uint32_t bits = __builtin_bit_cast(uint32_t, v);
    const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    return static_cast<uint16_t>(v != v ? 0x7FC0u : rounded);
  }
};

template <>
struct Element<c10::Half> {
  using raw = uint16_t;
  static float load(uint16_t bits) {
    const uint32_t sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
    const uint32_t magnitude = bits & 0x7FFFu;
    // Normal numbers: the exponent rebiased from 15 to 127; inf and nan: exponent 31 to 255.
    const uint32_t rebiased = (magnitude << 13) + (112u << 23) + (magnitude >= 0x7C00u ? 112u << 23 : 0u);
    // Zero and subnormals: magnitude · 2^-24, exact in float32. Picked with a bit mask: GCC keeps a
    // `?:` whose one side is a float operation as a branch, which stops the loop's vectorisation.
    const float subnormal = static_cast<float>(static_cast<int32_t>(magnitude)) * 0x1p-24f;
    const uint32_t is_subnormal = 0u - static_cast<uint32_t>(magnitude < 0x0400u);  // all ones or zero
    const uint32_t abs_bits = (__builtin_bit_cast(uint32_t, subnormal) & is_subnormal) | (rebiased & ~is_subnormal);
    return __builtin_bit_cast(float, abs_bits | sign);
  }
  static uint16_t store(float v) {
    const uint32_t bits = __builtin_bit_cast(uint32_t, v);
    const uint32_t sign = (bits >> 16) & 0x8000u;
    const uint32_t abs_bits = bits & 0x7FFFFFFFu;
    // Normal range: rebias the exponent and drop 13 mantissa bits, to nearest even (a carry out of
    // the mantissa raises the exponent, as it should).
    const uint32_t normal = (abs_bits - (112u << 23) + 0x0FFFu + ((abs_bits >> 13) & 1u)) >> 13;
    // Below 2^-14: adding 0.5 (whose ulp is 2^-24, the subnormals' step) makes the float adder round
    // |v| to nearest even; the low bits are then the subnormal (0x400: rounded up to 2^-14).
    const uint32_t subnormal = __builtin_bit_cast(uint32_t, __builtin_bit_cast(float, abs_bits) + 0.5f) - 0x3F000000u;
    uint32_t half = abs_bits < 0x38800000u ? subnormal : normal;
    half = abs_bits >= 0x477FF000u ? 0x7C00u : half;  // 65520 and above round to inf
    half = abs_bits > 0x7F800000u ? 0x7E00u : half;   // nan
    return static_cast<uint16_t>(half | sign);
  }
};

// v rounded to scalar_t and back: the reference's `.to(dtype)` of the normalised activations.
template <typename scalar_t>
inline float round_to(float v) {
  return Element<scalar_t>::load(Element<scalar_t>::store(v));
}

// The weight in float32, once per thread, for the row loops: with the weight converted inside them,
// GCC 12 vectorised the backward's reduction with gather instructions, four times slower.
template <typename scalar_t>
std::vector<float> weight_as_float(const typename Element<scalar_t>::raw* w, int64_t hidden) {
  std::vector<float> weight(hidden);
  float* out = weight.data();
#pragma omp simd
  for (int64_t j = 0; j < hidden; ++j) {
    out[j] = Element<scalar_t>::load(w[j]);
  }
  return weight;
}

// x: (N, H) contiguous in H, rows `row_stride` apart; y: (N, H) contiguous.
template <typename scalar_t>
void forward_rows(const scalar_t* x_ptr, int64_t row_stride, const scalar_t* w_ptr, int64_t rows, int64_t hidden,
                  float eps, scalar_t* y_ptr, float* rstd) {
  using E = Element<scalar_t>;
  using raw = typename E::raw;
  const auto* x = reinterpret_cast<const raw*>(x_ptr);
  const auto* w = reinterpret_cast<const raw*>(w_ptr);
  auto* y = reinterpret_cast<raw*>(y_ptr);
  const int64_t grain = std::max<int64_t>(1, kGrainElements / hidden);
  at::parallel_for(0, rows, grain, [=](int64_t begin, int64_t end) {
    const std::vector<float> weight = weight_as_float<scalar_t>(w, hidden);
    const float* wf = weight.data();
    for (int64_t row = begin; row < end; ++row) {
      const raw* xr = x + row * row_stride;
      raw* yr = y + row * hidden;
      float sum_sq = 0.0f;
#pragma omp simd reduction(+ : sum_sq)
      for (int64_t j = 0; j < hidden; ++j) {
        const float v = E::load(xr[j]);
        sum_sq += v * v;
      }
      const float r = 1.0f / std::sqrt(sum_sq / static_cast<float>(hidden) + eps);
#pragma omp simd
      for (int64_t j = 0; j < hidden; ++j) {
        yr[j] = E::store(wf[j] * round_to<scalar_t>(E::load(xr[j]) * r));
      }
      rstd[row] = r;
    }
  });
}

// grad_y, x: (N, H) contiguous in H with their own row strides; grad_x: (N, H) contiguous;
// grad_w: (H,) float32, the sum over rows.
template <typename scalar_t>
void backward_rows(const scalar_t* grad_y_ptr, int64_t grad_row_stride, const scalar_t* x_ptr, int64_t row_stride,
                   const scalar_t* w_ptr, const float* rstd, int64_t rows, int64_t hidden, scalar_t* grad_x_ptr,
                   float* grad_w) {
  using E = Element<scalar_t>;
  using raw = typename E::raw;
  const auto* dy = reinterpret_cast<const raw*>(grad_y_ptr);
  const auto* x = reinterpret_cast<const raw*>(x_ptr);
  const auto* w = reinterpret_cast<const raw*>(w_ptr);
  auto* dx = reinterpret_cast<raw*>(grad_x_ptr);
  std::fill(grad_w, grad_w + hidden, 0.0f);
  if (rows == 0) {
    return;
  }
  const int64_t min_rows = std::max<int64_t>(1, kGrainElements / hidden);
  const int64_t wanted_blocks = std::clamp<int64_t>(rows / min_rows, 1, kMaxBlocks);
  const int64_t rows_per_block = (rows + wanted_blocks - 1) / wanted_blocks;
  const int64_t blocks = (rows + rows_per_block - 1) / rows_per_block;
  const auto partial = at::zeros({blocks, hidden}, at::TensorOptions().dtype(at::kFloat));  // (blocks, H)
  float* partial_w = partial.mutable_data_ptr<float>();
  const float inv_hidden = 1.0f / static_cast<float>(hidden);

  at::parallel_for(0, blocks, 1, [=](int64_t block_begin, int64_t block_end) {
    const std::vector<float> weight = weight_as_float<scalar_t>(w, hidden);
    const float* wf = weight.data();
    for (int64_t block = block_begin; block < block_end; ++block) {
      float* dw = partial_w + block * hidden;
      const int64_t last = std::min(rows, (block + 1) * rows_per_block);
      for (int64_t row = block * rows_per_block; row < last; ++row) {
        const raw* dyr = dy + row * grad_row_stride;
        const raw* xr = x + row * row_stride;
        raw* dxr = dx + row * hidden;
        const float r = rstd[row];
        float dot = 0.0f;  // Σ g·x, so that mean(g·x̂) = r·dot / H
#pragma omp simd reduction(+ : dot)
        for (int64_t j = 0; j < hidden; ++j) {
          dot += (E::load(dyr[j]) * wf[j]) * E::load(xr[j]);
        }
        const float mean_dot = r * dot * inv_hidden;
#pragma omp simd
        for (int64_t j = 0; j < hidden; ++j) {
          const float grad = E::load(dyr[j]);
          const float x_hat = E::load(xr[j]) * r;
          dxr[j] = E::store(r * (grad * wf[j] - x_hat * mean_dot));
          dw[j] += grad * round_to<scalar_t>(x_hat);
        }
      }
    }
  });
  for (int64_t block = 0; block < blocks; ++block) {
    const float* dw = partial_w + block * hidden;
#pragma omp simd
    for (int64_t j = 0; j < hidden; ++j) {
      grad_w[j] += dw[j];
    }
  }
}

#define SAFERLHF_DISPATCH_ACTIVATIONS(TYPE, NAME, ...)             \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                   \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)     \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

// Rows contiguous in H (any stride between rows); H = 1 and N = 0 have no stride to check.
void check_rows(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "saferlhf::rms_norm: CPU tensors only, ", name, " is on ", t.device());
  TORCH_CHECK(t.dim() == 2 && t.sizes() == x.sizes(), name, " must be (N, H) = ", x.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), name, " must be ", x.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.size(1) <= 1 || t.size(0) == 0 || t.stride(1) == 1, name, " must be contiguous in H");
}

void check_weight(const at::Tensor& x, const at::Tensor& weight) {
  check_rows(x, x, "x");
  TORCH_CHECK(x.size(1) > 0, "saferlhf::rms_norm: the hidden size must be > 0");
  TORCH_CHECK(weight.device().is_cpu() && weight.dim() == 1 && weight.size(0) == x.size(1) &&
                  weight.scalar_type() == x.scalar_type() && weight.is_contiguous(),
              "weight must be a contiguous (", x.size(1), ",) ", x.scalar_type(), " CPU tensor, got ", weight.sizes(),
              " ", weight.scalar_type());
}

// x: (N, H) -> (y (N, H) in x's dtype, rstd (N,) float32).
std::tuple<at::Tensor, at::Tensor> rms_norm_forward(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_weight(x, weight);
  const int64_t rows = x.size(0);
  const int64_t hidden = x.size(1);
  auto y = at::empty({rows, hidden}, x.options());
  auto rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  SAFERLHF_DISPATCH_ACTIVATIONS(x.scalar_type(), "rms_norm_forward", [&] {
    forward_rows(x.const_data_ptr<scalar_t>(), x.stride(0), weight.const_data_ptr<scalar_t>(), rows, hidden,
                 static_cast<float>(eps), y.mutable_data_ptr<scalar_t>(), rstd.mutable_data_ptr<float>());
  });
  return {y, rstd};
}

// (grad_y, x: (N, H), weight: (H,), rstd: (N,) from the forward) -> (grad_x (N, H), grad_w (H,)), both
// in x's dtype.
std::tuple<at::Tensor, at::Tensor> rms_norm_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                     const at::Tensor& weight, const at::Tensor& rstd) {
  check_weight(x, weight);
  check_rows(grad_y, x, "grad_y");
  TORCH_CHECK(rstd.scalar_type() == at::kFloat && rstd.dim() == 1 && rstd.size(0) == x.size(0),
              "rstd must be the (N,) float32 output of rms_norm_forward");
  const auto rstd_c = rstd.contiguous();
  const int64_t rows = x.size(0);
  const int64_t hidden = x.size(1);
  auto grad_x = at::empty({rows, hidden}, x.options());
  auto grad_w = at::empty({hidden}, x.options().dtype(at::kFloat));
  SAFERLHF_DISPATCH_ACTIVATIONS(x.scalar_type(), "rms_norm_backward", [&] {
    backward_rows(grad_y.const_data_ptr<scalar_t>(), grad_y.stride(0), x.const_data_ptr<scalar_t>(), x.stride(0),
                  weight.const_data_ptr<scalar_t>(), rstd_c.const_data_ptr<float>(), rows, hidden,
                  grad_x.mutable_data_ptr<scalar_t>(), grad_w.mutable_data_ptr<float>());
  });
  return {grad_x, grad_w.to(x.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(saferlhf, m) {
  m.def("rms_norm_forward(Tensor x, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rms_norm_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor rstd) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(saferlhf, CPU, m) {
  m.impl("rms_norm_forward", &rms_norm_forward);
  m.impl("rms_norm_backward", &rms_norm_backward);
}
