// Token log-probabilities from logits on CPU: log-softmax + label gather in one streaming pass.
//
// Reference: saferlhf.algorithms.logprobs.gather_logprobs (DESIGN §3, §4).
//
// Notation: N rows (all leading dimensions of the logits flattened), V vocabulary, τ temperature,
// z = x / τ the scaled logits of one row, y its label.
//
//   forward:   m = max_v z_v,  s = log Σ_v exp(z_v - m)   (online: a running max and a running sum)
//              logp = (z_y - m) - s
//   backward:  ∂logp/∂x_v = (1[v = y] - p_v) / τ,   p_v = exp((z_v - m) - s)
//
// The row is read in chunks that fit in L1: a chunk's maximum, then its Σ exp, both over the cached
// chunk, so memory is streamed once and no (N, V) temporary exists. The softmax is never
// materialised: the backward recomputes p_v from the saved (m, s) while it writes the gradient,
// possibly into the logits buffer itself (the caller passes the same tensor). m and s are saved
// apart, not as lse = m + s: rounding lse to float32 at |lse| ~ 20 costs ~1e-6 absolute, which
// p_v ≈ 1 would carry into 1 - p_v.
//
// Rows run in parallel with at::parallel_for, which is torch's OpenMP runtime (the extension is
// built with -fopenmp); the inner loops are `omp simd` loops over a chunk with a branch-free exp,
// which the compiler turns into vector code. Logits may be float32, bfloat16 or float16; all
// arithmetic is float32.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

// The logits dtypes served here; float64 (the tests' ground truth) stays on the reference.
#define SAFERLHF_DISPATCH_LOGITS(TYPE, NAME, ...)                  \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                   \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)     \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

namespace {

// Elements of work below which a parallel region costs more than it saves (ATen uses the same).
constexpr int64_t kGrainElements = 32768;

// 2048 float32 = 8 KiB: a chunk and its converted copy stay in L1 between the max and the sum pass.
constexpr int64_t kChunk = 2048;

// e^x for x <= 88, branch-free so that a loop over it vectorises (libm's expf does not).
// e^x = 2^n · e^r with n = round(x·log2 e) and r = x - n·ln 2 in [-ln2/2, ln2/2]; ln 2 is split into
// a short high part (n·ln2_hi is exact) and a correction. e^r is its Taylor series to degree 7, whose
// truncation error (≤ 0.35^8/8! ≈ 5e-9 relative) is below float32 rounding. Below -87 (where 2^n
// would leave the normal range, and for -inf) the result is 0; nan stays nan (the clamps below
// compile to vector min/max instructions, which would otherwise turn it into a number).
inline float exp_approx(float x) {
  const float input = x;
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kRoundMagic = 12582912.0f;  // 1.5·2^23: adding it rounds to an integer
  const bool underflow = x < -87.0f;
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float shifted = x * kLog2e + kRoundMagic;
  const float n = shifted - kRoundMagic;
  // The integer n sits in the low mantissa bits of `shifted`.
  const int32_t n_int = __builtin_bit_cast(int32_t, shifted) - __builtin_bit_cast(int32_t, kRoundMagic);
  const float r = (x - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const float two_n = __builtin_bit_cast(float, (n_int + 127) << 23);
  return underflow ? 0.0f : (input != input ? input : p * two_n);
}

// float32 -> bfloat16 bits, rounding to nearest even as c10::BFloat16(float) does, but branch-free
// (a select for nan), so that a loop of it vectorises.
inline uint16_t bfloat16_bits(float x) {
  const uint32_t bits = __builtin_bit_cast(uint32_t, x);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(x != x ? 0x7FC0u : rounded);
}

// Element offsets of the rows of a (..., V) tensor whose last dimension is contiguous: any strides
// on the leading dimensions (a `logits[:, :-1]` view is read in place, without a copy).
std::vector<int64_t> row_offsets(const at::Tensor& x) {
  const int64_t leading = x.dim() - 1;
  const int64_t rows = x.numel() / x.size(-1);
  std::vector<int64_t> offsets(rows);
  for (int64_t row = 0; row < rows; ++row) {
    int64_t rest = row;
    int64_t offset = 0;
    for (int64_t d = leading - 1; d >= 0; --d) {
      offset += (rest % x.size(d)) * x.stride(d);
      rest /= x.size(d);
    }
    offsets[row] = offset;
  }
  return offsets;
}

void check_logits(const at::Tensor& logits, const at::Tensor& labels) {
  TORCH_CHECK(logits.device().is_cpu(), "saferlhf::logprobs: CPU tensors only");
  TORCH_CHECK(logits.dim() >= 1 && logits.size(-1) > 0, "logits must be (..., V) with V > 0");
  TORCH_CHECK(logits.stride(-1) == 1, "logits must be contiguous in the vocabulary dimension");
  TORCH_CHECK(labels.scalar_type() == at::kLong, "labels must be int64");
  TORCH_CHECK(labels.sizes() == logits.sizes().slice(0, logits.dim() - 1),
              "labels must have the shape of logits without its last dimension");
}

// Every label in [0, V): a wrong id would read outside its row. Checked once, before any parallel
// region, so that no error is ever raised from inside one.
void check_labels(const at::Tensor& labels_c, int64_t vocab) {
  const int64_t* ids = labels_c.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < labels_c.numel(); ++i) {
    TORCH_CHECK(ids[i] >= 0 && ids[i] < vocab, "label ", ids[i], " at row ", i, " out of range [0, ", vocab, ")");
  }
}

template <typename scalar_t>
void forward_rows(const scalar_t* logits, const std::vector<int64_t>& offsets, const int64_t* labels,
                  int64_t vocab, float inv_temp, float* logp, float* row_max, float* log_sum) {
  const int64_t rows = static_cast<int64_t>(offsets.size());
  const int64_t grain = std::max<int64_t>(1, kGrainElements / vocab);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> chunk(kChunk);  // the scaled logits z of one chunk
    float* z = chunk.data();
    for (int64_t row = begin; row < end; ++row) {
      const scalar_t* x = logits + offsets[row];
      const int64_t label = labels[row];
      float running_max = -std::numeric_limits<float>::infinity();
      float running_sum = 0.0f;  // Σ exp(z - running_max) over the chunks seen so far
      for (int64_t start = 0; start < vocab; start += kChunk) {
        const int64_t n = std::min(kChunk, vocab - start);
        float chunk_max = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : chunk_max)
        for (int64_t j = 0; j < n; ++j) {
          z[j] = static_cast<float>(x[start + j]) * inv_temp;
          chunk_max = std::max(chunk_max, z[j]);
        }
        if (chunk_max > running_max) {
          // exp(-inf) = 0 drops the empty initial sum.
          running_sum *= std::exp(running_max - chunk_max);
          running_max = chunk_max;
        }
        if (running_max == -std::numeric_limits<float>::infinity()) {
          continue;  // every logit so far is -inf: nothing to add, and -inf - (-inf) would be nan
        }
        float chunk_sum = 0.0f;
#pragma omp simd reduction(+ : chunk_sum)
        for (int64_t j = 0; j < n; ++j) {
          chunk_sum += exp_approx(z[j] - running_max);
        }
        running_sum += chunk_sum;
      }
      row_max[row] = running_max;
      log_sum[row] = std::log(running_sum);
      logp[row] = (static_cast<float>(x[label]) * inv_temp - running_max) - log_sum[row];
    }
  });
}

template <typename scalar_t>
void backward_rows(const float* grad_logp, const scalar_t* logits, const std::vector<int64_t>& offsets,
                   const int64_t* labels, const float* row_max, const float* log_sum, int64_t vocab, float inv_temp,
                   scalar_t* grad_logits, const std::vector<int64_t>& grad_offsets) {
  const int64_t rows = static_cast<int64_t>(offsets.size());
  const int64_t grain = std::max<int64_t>(1, kGrainElements / vocab);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> chunk(kChunk);  // one chunk of the row's gradient, in float32
    float* grad = chunk.data();
    for (int64_t row = begin; row < end; ++row) {
      const scalar_t* x = logits + offsets[row];
      scalar_t* dx = grad_logits + grad_offsets[row];  // may be x itself (in-place backward)
      const int64_t label = labels[row];
      const float scale = grad_logp[row] * inv_temp;
      const float m = row_max[row];
      const float s = log_sum[row];
      // Read before the loop: in place, the loop overwrites x[label].
      const float p_label = exp_approx((static_cast<float>(x[label]) * inv_temp - m) - s);
      // Three passes over an L1-resident chunk, each a plain loop the compiler vectorises; the
      // whole chunk is read before any of it is written, so dx may be x.
      for (int64_t start = 0; start < vocab; start += kChunk) {
        const int64_t n = std::min(kChunk, vocab - start);
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) {
          grad[j] = static_cast<float>(x[start + j]) * inv_temp;
        }
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) {
          grad[j] = -scale * exp_approx((grad[j] - m) - s);
        }
        if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
          auto* out = reinterpret_cast<uint16_t*>(dx + start);
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) {
            out[j] = bfloat16_bits(grad[j]);
          }
        } else {
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) {
            dx[start + j] = static_cast<scalar_t>(grad[j]);
          }
        }
      }
      dx[label] = static_cast<scalar_t>(scale * (1.0f - p_label));
    }
  });
}

// (..., V) logits, (...) labels, τ -> ((...) logp, (...) m, (...) s), all float32.
std::tuple<at::Tensor, at::Tensor, at::Tensor> logprobs_forward(const at::Tensor& logits,
                                                                const at::Tensor& labels, double temperature) {
  check_logits(logits, labels);
  TORCH_CHECK(temperature > 0, "temperature must be > 0, got ", temperature);
  const auto labels_c = labels.contiguous();
  check_labels(labels_c, logits.size(-1));
  const auto options = logits.options().dtype(at::kFloat);
  auto logp = at::empty(labels.sizes(), options);
  auto row_max = at::empty(labels.sizes(), options);
  auto log_sum = at::empty(labels.sizes(), options);
  const auto offsets = row_offsets(logits);
  const auto inv_temp = static_cast<float>(1.0 / temperature);
  SAFERLHF_DISPATCH_LOGITS(logits.scalar_type(), "logprobs_forward", [&] {
    forward_rows(logits.const_data_ptr<scalar_t>(), offsets, labels_c.const_data_ptr<int64_t>(),
                 logits.size(-1), inv_temp, logp.mutable_data_ptr<float>(), row_max.mutable_data_ptr<float>(),
                 log_sum.mutable_data_ptr<float>());
  });
  return {logp, row_max, log_sum};
}

// Writes d(logp · grad_logp)/d(logits) into grad_logits, which has the logits' shape and dtype and
// may be the logits tensor itself.
void logprobs_backward(const at::Tensor& grad_logp, const at::Tensor& logits, const at::Tensor& labels,
                       const at::Tensor& row_max, const at::Tensor& log_sum, double temperature,
                       const at::Tensor& grad_logits) {
  check_logits(logits, labels);
  TORCH_CHECK(grad_logits.sizes() == logits.sizes() && grad_logits.scalar_type() == logits.scalar_type() &&
                  grad_logits.stride(-1) == 1,
              "grad_logits must match the logits in shape and dtype, contiguous in V");
  TORCH_CHECK(grad_logp.sizes() == labels.sizes() && row_max.sizes() == labels.sizes() &&
                  log_sum.sizes() == labels.sizes(),
              "grad_logp, row_max and log_sum must have the labels' shape");
  TORCH_CHECK(row_max.scalar_type() == at::kFloat && log_sum.scalar_type() == at::kFloat,
              "row_max and log_sum must be the float32 outputs of logprobs_forward");
  const auto grad_c = grad_logp.to(at::kFloat).contiguous();
  const auto row_max_c = row_max.contiguous();
  const auto log_sum_c = log_sum.contiguous();
  const auto labels_c = labels.contiguous();
  check_labels(labels_c, logits.size(-1));
  const auto offsets = row_offsets(logits);
  const auto grad_offsets = row_offsets(grad_logits);
  const auto inv_temp = static_cast<float>(1.0 / temperature);
  SAFERLHF_DISPATCH_LOGITS(logits.scalar_type(), "logprobs_backward", [&] {
    backward_rows(grad_c.const_data_ptr<float>(), logits.const_data_ptr<scalar_t>(), offsets,
                  labels_c.const_data_ptr<int64_t>(), row_max_c.const_data_ptr<float>(),
                  log_sum_c.const_data_ptr<float>(), logits.size(-1), inv_temp,
                  grad_logits.mutable_data_ptr<scalar_t>(), grad_offsets);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(saferlhf, m) {
  m.def("logprobs_forward(Tensor logits, Tensor labels, float temperature) -> (Tensor, Tensor, Tensor)");
  m.def(
      "logprobs_backward(Tensor grad_logp, Tensor logits, Tensor labels, Tensor row_max, Tensor log_sum, "
      "float temperature, Tensor(a!) grad_logits) -> ()");
}

TORCH_LIBRARY_IMPL(saferlhf, CPU, m) {
  m.impl("logprobs_forward", &logprobs_forward);
  m.impl("logprobs_backward", &logprobs_backward);
}
