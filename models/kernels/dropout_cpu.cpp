// Dropout on the CPU in one pass, its mask redrawn in the backward pass instead of stored; optionally fused with
// the activation before it (the FFNs' act -> dropout).
//
// out[e] = act(x[e]) * keep(e) / (1 - p), where keep(e) comes from a counter-based generator: the elements are
// taken in blocks of 2 * kLanes, and word w = block * kLanes + lane of SplitMix64 (the generator of
// time_pairs_cpu.cpp, at counter seed + w * golden ratio) gives its low 32 bits to element block * 2 * kLanes + lane
// and its high 32 bits to the element kLanes further on. An element is dropped where its 32 bits fall below
// round(p * 2^32). That layout keeps the loops over a block free of interleaving, so the compiler vectorises the
// generator. torch's path draws the mask with its generator, then compares, multiplies and fills (four passes over
// memory and a stored boolean mask), and an activation before it costs a pass each way more (torch's
// hardswish_backward alone took 2.5x a multiply's time); here forward and backward are one pass each, the mask
// is not stored, and the activation's slope is recomputed from its input (which the activation saved anyway).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "cpu_common.h"

namespace {

using harness::splitmix64;

constexpr int64_t kLanes = 16;
constexpr int64_t kBlock = 2 * kLanes;
constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;

struct Mask {
  uint64_t seed;
  uint32_t threshold;  // round(p * 2^32)
  double scale;        // 1 / (1 - p)
};

Mask make_mask(int64_t seed, double p) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "dropout probability must be in [0, 1)");
  const double threshold = std::min(std::round(p * 4294967296.0), 4294967295.0);
  return Mask{static_cast<uint64_t>(seed), static_cast<uint32_t>(threshold), 1.0 / (1.0 - p)};
}

// The activations, each its value and its slope, written as torch's CPU kernels write them (the same branches at
// the same boundaries), so a fused call differs from torch's act -> dropout by rounding only.
struct Identity {
  template <typename T>
  static T value(T x) { return x; }
  template <typename T>
  static T slope(T) { return T(1); }
};

struct Hardswish {
  template <typename T>
  static T value(T x) { return harness::hardswish(x); }
  template <typename T>
  static T slope(T x) { return harness::hardswish_slope(x); }
};

// The exact (erf) form, torch's default. 1 + erf(z) written as erfc(-z): the same function without the cancellation
// of 1 + erf(z) near -1, which cost the vectorised erf's float32 values 10% relative error at x = -5.
struct Gelu {
  template <typename T>
  static T value(T x) { return T(0.5) * x * std::erfc(-x * T(M_SQRT1_2)); }
  template <typename T>
  static T slope(T x) {
    const T cdf = T(0.5) * std::erfc(-x * T(M_SQRT1_2));
    const T pdf = std::exp(T(-0.5) * x * x) * T(M_2_SQRTPI * M_SQRT1_2 * 0.5);
    return cdf + x * pdf;
  }
};

struct Silu {
  template <typename T>
  static T value(T x) { return x * harness::sigmoid(x); }
  template <typename T>
  static T slope(T x) {
    const T s = harness::sigmoid(x);
    return s * (T(1) + x * (T(1) - s));
  }
};

struct Relu {
  template <typename T>
  static T value(T x) { return x <= T(0) ? T(0) : x; }  // a NaN passes, as in torch (fast-math permitting)
  template <typename T>
  static T slope(T x) { return x > T(0) ? T(1) : T(0); }
};

// For the elements of blocks [first, last) (the last block may be partial): forward, out[e] = act(x[e]) * factor;
// backward (grad given), out[e] = grad[e] * act'(x[e]) * factor, factor = keep(e) / (1 - p).
template <typename Act, bool kBackward, typename T>
void drop_activated(const Mask& mask, const T* __restrict x, const T* __restrict grad, T* __restrict out,
                    int64_t count, int64_t first, int64_t last) {
  const T scale = static_cast<T>(mask.scale);
  uint32_t bits[kBlock];
  for (int64_t block = first; block < last; ++block) {
    for (int64_t lane = 0; lane < kLanes; ++lane) {
      const uint64_t word = splitmix64(mask.seed + static_cast<uint64_t>(block * kLanes + lane) * kGolden);
      bits[lane] = static_cast<uint32_t>(word);
      bits[kLanes + lane] = static_cast<uint32_t>(word >> 32);
    }
    const int64_t start = block * kBlock;
    const int64_t width = std::min(kBlock, count - start);
    const T* __restrict x_b = x + start;
    T* __restrict out_b = out + start;
    // arithmetic, not a branch: the branch would be mispredicted on a fraction p of the elements
#pragma omp simd
    for (int64_t i = 0; i < width; ++i) {
      const T factor = static_cast<T>(bits[i] >= mask.threshold) * scale;
      if constexpr (kBackward) {
        out_b[i] = grad[start + i] * Act::slope(x_b[i]) * factor;
      } else {
        out_b[i] = Act::value(x_b[i]) * factor;
      }
    }
  }
}

template <typename Act, bool kBackward>
torch::Tensor run(const torch::Tensor& input, const torch::Tensor* grad_out, int64_t seed, double p) {
  TORCH_CHECK(input.device().is_cpu(), "dropout (C++): CPU tensors only");
  const auto x = input.contiguous();
  const auto grad = grad_out != nullptr ? grad_out->contiguous() : x;
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type(),
              "dropout (C++): the gradient must have the input's shape and dtype");
  auto out = torch::empty_like(x);
  const Mask mask = make_mask(seed, p);
  const int64_t count = x.numel();
  const int64_t blocks = (count + kBlock - 1) / kBlock;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dropout_cpu", [&] {
    const scalar_t* in = x.data_ptr<scalar_t>();
    const scalar_t* g = grad.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, blocks, 2048, [&](int64_t begin, int64_t end) {
      drop_activated<Act, kBackward, scalar_t>(mask, in, g, o, count, begin, end);
    });
  });
  return out;
}

template <bool kBackward>
torch::Tensor by_name(const std::string& activation, const torch::Tensor& x, const torch::Tensor* grad, int64_t seed,
                      double p) {
  if (activation == "identity") return run<Identity, kBackward>(x, grad, seed, p);
  if (activation == "hardswish") return run<Hardswish, kBackward>(x, grad, seed, p);
  if (activation == "gelu") return run<Gelu, kBackward>(x, grad, seed, p);
  if (activation == "silu") return run<Silu, kBackward>(x, grad, seed, p);
  if (activation == "relu") return run<Relu, kBackward>(x, grad, seed, p);
  TORCH_CHECK(false, "dropout (C++): unknown activation '", activation, "'");
}

// x * keep / (1 - p): plain dropout. The same map serves its backward pass (grad_out -> grad_x).
torch::Tensor apply(const torch::Tensor& x, int64_t seed, double p) {
  return by_name<false>("identity", x, nullptr, seed, p);
}

// act(x) * keep / (1 - p), and its backward pass grad * act'(x) * keep / (1 - p) (x: the activation's input).
torch::Tensor activate(const torch::Tensor& x, const std::string& activation, int64_t seed, double p) {
  return by_name<false>(activation, x, nullptr, seed, p);
}

torch::Tensor activate_backward(const torch::Tensor& grad_out, const torch::Tensor& x, const std::string& activation,
                                int64_t seed, double p) {
  return by_name<true>(activation, x, &grad_out, seed, p);
}

// The keep factors (0 or 1 / (1 - p)) of `count` elements, float32: what `apply` multiplies by. Tests only.
torch::Tensor keep_factors(int64_t seed, int64_t count, double p) {
  return apply(torch::ones({count}, torch::kFloat32), seed, p);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("apply", &apply, "x * keep / (1 - p), the mask drawn from (seed, element index)");
  m.def("activate", &activate, "act(x) * keep / (1 - p)");
  m.def("activate_backward", &activate_backward, "grad * act'(x) * keep / (1 - p)");
  m.def("keep_factors", &keep_factors, "the keep factors of `count` elements (tests)");
}
