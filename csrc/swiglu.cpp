// The SwiGLU gate of Llama's MLP on CPU: silu(gate) · up in one pass, its backward in one more.
//
// Reference: saferlhf.algorithms.layers.swiglu (DESIGN §4). Notation: a = gate, b = up (any shape,
// the same for both, flattened), σ the sigmoid, dc the upstream gradient.
//
//   forward:   s = round(a·σ(a)),   c = s·b
//   backward:  db = dc·s,   da = dc·b·σ(a)·(1 + a·(1 − σ(a)))
//
// `round` is the rounding to the inputs' dtype that the reference's separate silu does (nothing for
// float32); a·σ(a) is computed as a / (1 + e^-a), as torch's silu does. The backward recomputes σ(a)
// from the gate instead of keeping silu's output, so only gate and up are saved.
//
// Elementwise: at::parallel_for (torch's OpenMP runtime; the extension is built with -fopenmp)
// splits the elements into one contiguous range per thread, and each range is one `omp simd` loop
// with a branch-free exp, which the compiler turns into vector code. Inputs may be float32, bfloat16
// or float16; all arithmetic is float32.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

namespace {

// Elements of work below which a parallel region costs more than it saves (ATen uses the same).
constexpr int64_t kGrainElements = 32768;

// a·b + c, fused where the CPU has an FMA instruction (the build's -ffp-contract=off fuses nothing
// on its own): the exp below in FMAs took a fifth off the forward's time.
[[gnu::always_inline]] inline float mul_add(float a, float b, float c) {
#ifdef FP_FAST_FMAF
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// e^x, branch-free so that a loop over it vectorises (libm's expf does not): logprobs.cpp's
// exp_approx, whose comment derives it, with its polynomial in FMAs and +inf above 88 (where
// float32 overflows at 88.72; between the two, 1/(1 + e^x) is subnormal, and 0 is as good), so that
// silu(-inf) is nan as in torch. Below -87 the result is 0; nan stays nan. Always inlined: GCC 12
// left it a call in some of the loops below, which then did not vectorise (ten times slower).
[[gnu::always_inline]] inline float exp_approx(float x) {
  const float input = x;
  const bool overflow = x > 88.0f;
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kRoundMagic = 12582912.0f;  // 1.5·2^23: adding it rounds to an integer
  const bool underflow = x < -87.0f;
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float shifted = x * kLog2e + kRoundMagic;
  const float n = shifted - kRoundMagic;
  const int32_t n_int = __builtin_bit_cast(int32_t, shifted) - __builtin_bit_cast(int32_t, kRoundMagic);
  const float r = (x - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.0f / 5040.0f;
  p = mul_add(p, r, 1.0f / 720.0f);
  p = mul_add(p, r, 1.0f / 120.0f);
  p = mul_add(p, r, 1.0f / 24.0f);
  p = mul_add(p, r, 1.0f / 6.0f);
  p = mul_add(p, r, 0.5f);
  p = mul_add(p, r, 1.0f);
  p = mul_add(p, r, 1.0f);
  const float two_n = __builtin_bit_cast(float, (n_int + 127) << 23);
  const float result = underflow ? 0.0f : (input != input ? input : p * two_n);
  return overflow ? std::numeric_limits<float>::infinity() : result;
}

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

// v rounded to scalar_t and back: the reference's silu output in the inputs' dtype.
template <typename scalar_t>
inline float round_to(float v) {
  return Element<scalar_t>::load(Element<scalar_t>::store(v));
}

// One thread's range of the forward: out = round(silu(gate)) · up over n elements.
template <typename scalar_t, typename raw = typename Element<scalar_t>::raw>
void forward_range(const raw* gate, const raw* up, int64_t n, raw* out) {
  using E = Element<scalar_t>;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float a = E::load(gate[i]);
    const float silu = round_to<scalar_t>(a / (1.0f + exp_approx(-a)));
    out[i] = E::store(silu * E::load(up[i]));
  }
}

// One thread's range of the backward: (grad_gate, grad_up) from the upstream grad over n elements.
template <typename scalar_t, typename raw = typename Element<scalar_t>::raw>
void backward_range(const raw* grad, const raw* gate, const raw* up, int64_t n, raw* grad_gate, raw* grad_up) {
  using E = Element<scalar_t>;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float dc = E::load(grad[i]);
    const float a = E::load(gate[i]);
    const float denominator = 1.0f + exp_approx(-a);
    const float sig = 1.0f / denominator;
    grad_up[i] = E::store(dc * round_to<scalar_t>(a / denominator));
    grad_gate[i] = E::store(dc * E::load(up[i]) * sig * (1.0f + a * (1.0f - sig)));
  }
}

template <typename scalar_t>
void forward_elements(const scalar_t* gate_ptr, const scalar_t* up_ptr, int64_t n, scalar_t* out_ptr) {
  using raw = typename Element<scalar_t>::raw;
  const auto* gate = reinterpret_cast<const raw*>(gate_ptr);
  const auto* up = reinterpret_cast<const raw*>(up_ptr);
  auto* out = reinterpret_cast<raw*>(out_ptr);
  at::parallel_for(0, n, kGrainElements, [=](int64_t begin, int64_t end) {
    forward_range<scalar_t>(gate + begin, up + begin, end - begin, out + begin);
  });
}

template <typename scalar_t>
void backward_elements(const scalar_t* grad_ptr, const scalar_t* gate_ptr, const scalar_t* up_ptr, int64_t n,
                       scalar_t* grad_gate_ptr, scalar_t* grad_up_ptr) {
  using raw = typename Element<scalar_t>::raw;
  const auto* grad = reinterpret_cast<const raw*>(grad_ptr);
  const auto* gate = reinterpret_cast<const raw*>(gate_ptr);
  const auto* up = reinterpret_cast<const raw*>(up_ptr);
  auto* grad_gate = reinterpret_cast<raw*>(grad_gate_ptr);
  auto* grad_up = reinterpret_cast<raw*>(grad_up_ptr);
  at::parallel_for(0, n, kGrainElements, [=](int64_t begin, int64_t end) {
    backward_range<scalar_t>(grad + begin, gate + begin, up + begin, end - begin, grad_gate + begin, grad_up + begin);
  });
}

#define SAFERLHF_DISPATCH_ACTIVATIONS(TYPE, NAME, ...)             \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                   \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)     \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

void check_like(const at::Tensor& t, const at::Tensor& gate, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "saferlhf::swiglu: CPU tensors only, ", name, " is on ", t.device());
  TORCH_CHECK(t.sizes() == gate.sizes() && t.scalar_type() == gate.scalar_type(), name, " must be ", gate.sizes(),
              " ", gate.scalar_type(), ", got ", t.sizes(), " ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// gate, up: any shape, contiguous -> silu(gate)·up, the same shape and dtype.
at::Tensor swiglu_forward(const at::Tensor& gate, const at::Tensor& up) {
  check_like(gate, gate, "gate");
  check_like(up, gate, "up");
  auto out = at::empty_like(gate);
  SAFERLHF_DISPATCH_ACTIVATIONS(gate.scalar_type(), "swiglu_forward", [&] {
    forward_elements(gate.const_data_ptr<scalar_t>(), up.const_data_ptr<scalar_t>(), gate.numel(),
                     out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

// (grad, gate, up) of one shape -> (grad_gate, grad_up).
std::tuple<at::Tensor, at::Tensor> swiglu_backward(const at::Tensor& grad, const at::Tensor& gate,
                                                   const at::Tensor& up) {
  check_like(gate, gate, "gate");
  check_like(up, gate, "up");
  check_like(grad, gate, "grad");
  auto grad_gate = at::empty_like(gate);
  auto grad_up = at::empty_like(up);
  SAFERLHF_DISPATCH_ACTIVATIONS(gate.scalar_type(), "swiglu_backward", [&] {
    backward_elements(grad.const_data_ptr<scalar_t>(), gate.const_data_ptr<scalar_t>(),
                      up.const_data_ptr<scalar_t>(), gate.numel(), grad_gate.mutable_data_ptr<scalar_t>(),
                      grad_up.mutable_data_ptr<scalar_t>());
  });
  return {grad_gate, grad_up};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(saferlhf, m) {
  m.def("swiglu_forward(Tensor gate, Tensor up) -> Tensor");
  m.def("swiglu_backward(Tensor grad, Tensor gate, Tensor up) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(saferlhf, CPU, m) {
  m.impl("swiglu_forward", &swiglu_forward);
  m.impl("swiglu_backward", &swiglu_backward);
}
