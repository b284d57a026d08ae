// KL-shaped per-token reward and cost signals on CPU, both streams in one pass.
//
// Reference: saferlhf.algorithms.shaping.shape_rewards (DESIGN §3). Notation: B rows, T response
// tokens, β the KL coefficient, R and C the end scores, `end` each row's last position with
// mask != 0 (none for an empty row).
//
//   kl_t = logp_old_t - logp_ref_t
//   r_t  = clip(-β·kl_t + 1[t = end]·R, -clip, clip),   c_t = clip(+β·kl_t + 1[t = end]·C, -clip, clip)
//
// and 0 where mask = 0 (selected, not multiplied: a padding log-prob of inf or nan never leaks).
// Rows run in parallel (at::parallel_for: torch's OpenMP runtime); per row one backwards scan finds
// `end`, then one vectorisable loop writes both streams. Inputs arrive as float32 (the caller
// converts); math is float32.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

namespace {

// Elements per parallel chunk. An element here is a nanosecond of work, so ATen's 32768 would make a
// chunk ~30 µs — less than the wait for one descheduled thread on a loaded machine. 2^20 (~1 ms)
// keeps rollouts of up to a million tokens serial.
constexpr int64_t kGrainElements = int64_t{1} << 20;

void check_input(const at::Tensor& x, at::IntArrayRef shape, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), "saferlhf::shape_rewards: CPU tensors only");
  TORCH_CHECK(x.sizes() == shape, name, " has shape ", x.sizes(), ", expected ", shape);
  TORCH_CHECK(x.scalar_type() == dtype && x.is_contiguous(), name, " must be contiguous ", dtype);
}

// logp_old, logp_ref: (B, T) float32; mask: (B, T) bool; reward, cost: (B,) float32.
// Returns (rewards, costs): (B, T) float32 each.
std::tuple<at::Tensor, at::Tensor> shape_rewards(const at::Tensor& logp_old, const at::Tensor& logp_ref,
                                                 const at::Tensor& mask, const at::Tensor& reward,
                                                 const at::Tensor& cost, double beta, double clip) {
  TORCH_CHECK(logp_old.dim() == 2, "logp_old must be (B, T)");
  const int64_t batch = logp_old.size(0);
  const int64_t length = logp_old.size(1);
  check_input(logp_old, {batch, length}, at::kFloat, "logp_old");
  check_input(logp_ref, {batch, length}, at::kFloat, "logp_ref");
  check_input(mask, {batch, length}, at::kBool, "mask");
  check_input(reward, {batch}, at::kFloat, "reward");
  check_input(cost, {batch}, at::kFloat, "cost");

  auto rewards = at::empty_like(logp_old);
  auto costs = at::empty_like(logp_old);
  const float* old_p = logp_old.const_data_ptr<float>();
  const float* ref_p = logp_ref.const_data_ptr<float>();
  const bool* real = mask.const_data_ptr<bool>();
  const float* reward_p = reward.const_data_ptr<float>();
  const float* cost_p = cost.const_data_ptr<float>();
  float* rewards_p = rewards.mutable_data_ptr<float>();
  float* costs_p = costs.mutable_data_ptr<float>();
  // The reference's python floats are applied as float32.
  const auto beta_f = static_cast<float>(beta);
  const auto clip_f = static_cast<float>(clip);

  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, length));
  at::parallel_for(0, batch, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t row = b * length;
      int64_t last = length - 1;
      while (last >= 0 && !real[row + last]) {
        --last;
      }
      // last == -1: an empty row, no end score is placed.
#pragma omp simd
      for (int64_t t = 0; t < length; ++t) {
        const float kl = old_p[row + t] - ref_p[row + t];
        const bool is_end = t == last;
        const float r = -beta_f * kl + (is_end ? reward_p[b] : 0.0f);
        const float c = beta_f * kl + (is_end ? cost_p[b] : 0.0f);
        rewards_p[row + t] = real[row + t] ? std::min(std::max(r, -clip_f), clip_f) : 0.0f;
        costs_p[row + t] = real[row + t] ? std::min(std::max(c, -clip_f), clip_f) : 0.0f;
      }
    }
  });
  return {rewards, costs};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(saferlhf, m) {
  m.def(
      "shape_rewards(Tensor logp_old, Tensor logp_ref, Tensor mask, Tensor reward, Tensor cost, float beta, "
      "float clip) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(saferlhf, CPU, m) {
  m.impl("shape_rewards", &shape_rewards);
}
