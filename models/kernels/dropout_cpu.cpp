// Dropout on the CPU in one pass, its mask redrawn in the backward pass instead of stored.
//
// out[e] = x[e] * keep(e) / (1 - p), where keep(e) comes from a counter-based generator: the elements are taken
// in blocks of 2 * kLanes, and word w = block * kLanes + lane of SplitMix64 (the generator of time_pairs_cpu.cpp,
// at counter seed + w * golden ratio) gives its low 32 bits to element block * 2 * kLanes + lane and its high
// 32 bits to the element kLanes further on. An element is dropped where its 32 bits fall below round(p * 2^32).
// That layout keeps the loops over a block free of interleaving, so the compiler vectorises the generator.
// torch's path draws the mask with its generator, then compares, multiplies and fills (four passes over memory
// and a stored boolean mask); here forward and backward are one pass each and nothing is stored.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

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

// out[e] = in[e] * keep(e) / (1 - p) for the elements of blocks [first, last) (the last block may be partial).
template <typename T>
void scale_kept(const Mask& mask, const T* __restrict in, T* __restrict out, int64_t count, int64_t first,
                int64_t last) {
  const T scale = static_cast<T>(mask.scale);
  uint32_t low[kLanes], high[kLanes];
  for (int64_t block = first; block < last; ++block) {
    for (int64_t lane = 0; lane < kLanes; ++lane) {
      const uint64_t bits = splitmix64(mask.seed + static_cast<uint64_t>(block * kLanes + lane) * kGolden);
      low[lane] = static_cast<uint32_t>(bits);
      high[lane] = static_cast<uint32_t>(bits >> 32);
    }
    const int64_t start = block * kBlock;
    if (start + kBlock <= count) {
      const T* x = in + start;
      T* y = out + start;
      for (int64_t lane = 0; lane < kLanes; ++lane) {
        // arithmetic, not a branch: the branch would be mispredicted on a fraction p of the elements
        y[lane] = x[lane] * (static_cast<T>(low[lane] >= mask.threshold) * scale);
        y[kLanes + lane] = x[kLanes + lane] * (static_cast<T>(high[lane] >= mask.threshold) * scale);
      }
    } else {  // the tail
      for (int64_t e = start; e < count; ++e) {
        const int64_t lane = (e - start) % kLanes;
        const uint32_t bits = e - start < kLanes ? low[lane] : high[lane];
        out[e] = in[e] * (static_cast<T>(bits >= mask.threshold) * scale);
      }
    }
  }
}

// The same map for forward (x -> out) and backward (grad_out -> grad_x): the mask is redrawn, not stored.
torch::Tensor apply(const torch::Tensor& input, int64_t seed, double p) {
  TORCH_CHECK(input.device().is_cpu(), "dropout (C++): CPU tensors only");
  const auto x = input.contiguous();
  auto out = torch::empty_like(x);
  const Mask mask = make_mask(seed, p);
  const int64_t count = x.numel();
  const int64_t blocks = (count + kBlock - 1) / kBlock;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dropout_cpu", [&] {
    const scalar_t* in = x.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, blocks, 2048, [&](int64_t begin, int64_t end) {
      scale_kept<scalar_t>(mask, in, o, count, begin, end);
    });
  });
  return out;
}

// The keep factors (0 or 1 / (1 - p)) of `count` elements, float32: what `apply` multiplies by. Tests only.
torch::Tensor keep_factors(int64_t seed, int64_t count, double p) {
  return apply(torch::ones({count}, torch::kFloat32), seed, p);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("apply", &apply, "x * keep / (1 - p), the mask drawn from (seed, element index)");
  m.def("keep_factors", &keep_factors, "the keep factors of `count` elements (tests)");
}
