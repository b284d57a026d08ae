// Reward GAE, K cost GAEs, their returns and the Lagrangian advantage on CPU, in one call.
//
// Reference: saferlhf.algorithms.gae.dual_gae (DESIGN §3). Notation: B rows, T response tokens,
// K cost streams (constraints), γ discount, λ_gae the GAE parameter, λ_k the Lagrange multipliers.
//
// Per stream and row, over the real tokens only (a masked position is skipped: it neither reads its
// reward nor value nor moves the carried state, and its advantage and return are 0):
//
//   A_t = r_t + γ·V_next - V_t + γ·λ_gae·A_next,   G_t = A_t + V_t
//
// where V_next, A_next belong to the next real token of the row (0 past the end). Then
//
//   A = (A_r - Σ_k λ_k·A_c,k) / (1 + Σ_k λ_k).
//
// The recurrence is sequential in t, so rows run in parallel (at::parallel_for: torch's OpenMP
// runtime) and each row is one reverse loop per stream; the Lagrangian combination is a separate
// vectorisable loop over the row. Inputs arrive as float32 (the caller converts); math is float32.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

namespace {

// One stream of one row: writes A and G over t = T-1 .. 0.
inline void gae_row(const float* rewards, const float* values, const bool* real, int64_t length, float gamma,
                    float gamma_lam, float* advantages, float* returns) {
  float next_value = 0.0f;
  float next_advantage = 0.0f;
  for (int64_t t = length - 1; t >= 0; --t) {
    if (real[t]) {
      const float delta = rewards[t] + gamma * next_value - values[t];
      const float advantage = delta + gamma_lam * next_advantage;
      advantages[t] = advantage;
      returns[t] = advantage + values[t];
      next_value = values[t];
      next_advantage = advantage;
    } else {
      advantages[t] = 0.0f;
      returns[t] = 0.0f;
    }
  }
}

void check_stream(const at::Tensor& x, at::IntArrayRef shape, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), "saferlhf::dual_gae: CPU tensors only");
  TORCH_CHECK(x.sizes() == shape, name, " has shape ", x.sizes(), ", expected ", shape);
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous(), name, " must be contiguous float32");
}

// rewards, values_r, mask: (B, T); costs, values_c: (K, B, T); lagrange_lambda: (K,) float32.
// Returns (adv_r, ret_r, adv_c, ret_c, adv): (B, T), (B, T), (K, B, T), (K, B, T), (B, T) float32.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dual_gae(
    const at::Tensor& rewards, const at::Tensor& costs, const at::Tensor& values_r, const at::Tensor& values_c,
    const at::Tensor& mask, double gamma, double lam, const at::Tensor& lagrange_lambda) {
  TORCH_CHECK(rewards.dim() == 2 && costs.dim() == 3, "rewards must be (B, T) and costs (K, B, T)");
  const int64_t batch = rewards.size(0);
  const int64_t length = rewards.size(1);
  const int64_t streams = costs.size(0);
  check_stream(rewards, {batch, length}, "rewards");
  check_stream(values_r, {batch, length}, "values_r");
  check_stream(costs, {streams, batch, length}, "costs");
  check_stream(values_c, {streams, batch, length}, "values_c");
  check_stream(lagrange_lambda, {streams}, "lagrange_lambda");
  TORCH_CHECK(mask.sizes() == rewards.sizes() && mask.scalar_type() == at::kBool && mask.is_contiguous(),
              "mask must be a contiguous (B, T) bool tensor");

  auto adv_r = at::empty_like(rewards);
  auto ret_r = at::empty_like(rewards);
  auto adv_c = at::empty_like(costs);
  auto ret_c = at::empty_like(costs);
  auto adv = at::empty_like(rewards);

  // Rounded as the reference rounds them: python floats multiplied in double, then used as float32.
  const auto gamma_f = static_cast<float>(gamma);
  const auto gamma_lam = static_cast<float>(gamma * lam);
  const float* lambdas = lagrange_lambda.const_data_ptr<float>();
  float lambda_sum = 0.0f;
  for (int64_t k = 0; k < streams; ++k) {
    lambda_sum += lambdas[k];
  }
  const float denominator = 1.0f + lambda_sum;

  const float* r = rewards.const_data_ptr<float>();
  const float* vr = values_r.const_data_ptr<float>();
  const float* c = costs.const_data_ptr<float>();
  const float* vc = values_c.const_data_ptr<float>();
  const bool* real = mask.const_data_ptr<bool>();
  float* ar = adv_r.mutable_data_ptr<float>();
  float* gr = ret_r.mutable_data_ptr<float>();
  float* ac = adv_c.mutable_data_ptr<float>();
  float* gc = ret_c.mutable_data_ptr<float>();
  float* a = adv.mutable_data_ptr<float>();
  const int64_t plane = batch * length;  // elements of one (B, T) stream

  // A row is T·(K+1) sequential steps of a few nanoseconds each. A parallel region pays off only when
  // every thread gets far more work than one scheduler time slice of waiting costs: on a loaded
  // machine a descheduled thread holds the whole region at its barrier (B = 64, T = 1024 took 20-30 ms
  // with two threads under load and 0.3 ms serially). Chunks of >= 2^20 steps (~1 ms) keep small
  // batches serial and large ones parallel.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(1, length * (streams + 1)));
  at::parallel_for(0, batch, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> penalty(length);  // Σ_k λ_k·A_c,k of one row
    for (int64_t b = begin; b < end; ++b) {
      const int64_t row = b * length;
      gae_row(r + row, vr + row, real + row, length, gamma_f, gamma_lam, ar + row, gr + row);
      std::fill(penalty.begin(), penalty.end(), 0.0f);
      for (int64_t k = 0; k < streams; ++k) {
        const int64_t offset = k * plane + row;
        gae_row(c + offset, vc + offset, real + row, length, gamma_f, gamma_lam, ac + offset, gc + offset);
        const float lambda_k = lambdas[k];
        const float* cost_advantage = ac + offset;
#pragma omp simd
        for (int64_t t = 0; t < length; ++t) {
          penalty[t] += lambda_k * cost_advantage[t];
        }
      }
      const float* reward_advantage = ar + row;
      float* out = a + row;
#pragma omp simd
      for (int64_t t = 0; t < length; ++t) {
        out[t] = (reward_advantage[t] - penalty[t]) / denominator;
      }
    }
  });
  return {adv_r, ret_r, adv_c, ret_c, adv};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(saferlhf, m) {
  m.def(
      "dual_gae(Tensor rewards, Tensor costs, Tensor values_r, Tensor values_c, Tensor mask, float gamma, "
      "float lam, Tensor lagrange_lambda) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(saferlhf, CPU, m) {
  m.impl("dual_gae", &dual_gae);
}
