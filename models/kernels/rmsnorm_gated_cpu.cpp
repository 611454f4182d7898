// Gated RMSNorm on the CPU, one group of features at a time, forward and backward in one pass over memory each.
//
// The torch twin (rmsnorm_gated.py) takes a SiLU, a product, a square, a mean, an rsqrt and two more products as
// whole-tensor operations, each a pass over [rows, features] memory, and autograd keeps their intermediates;
// here a group (128 features in the SSD models) stays in the L1 cache and the backward pass recomputes what it
// needs from x and z.
//
// Semantics follow rmsnorm_gated.py, per group g of `group_size` features of a row, s = silu(z) (1 without z):
//   norm_before_gate=false:  v = x s,  y = v r w        r = 1 / sqrt(mean_g(v^2) + eps)
//   norm_before_gate=true:   v = x,    y = v r w s
// Backward, with n = v r and gn the gradient reaching n (gy w, times s when the gate comes after the norm):
//   gv = r (gn - n mean_g(gn n)),  gx = gv s or gv,  gz from s' = sig(z) (1 + z (1 - sig(z))),  gw = sum gy n [s].

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "cpu_common.h"

namespace {

struct Norm {
  int64_t rows, features, group_size;
  double eps;
  bool gate_after;  // norm_before_gate
};

using harness::sigmoid;  // overflow-safe: a float32 gate below -88.7 gave NaN here

// One group's gate s = silu(z) (left at 1 without z) and, when `slope` is given, silu'(z); returns the group's
// r = 1 / sqrt(mean(v^2) + eps).
template <typename T>
T gate_and_rstd(const Norm& s, const T* __restrict xg, const T* zg, T* __restrict gate, T* slope) {
  if (zg != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < s.group_size; ++i) gate[i] = zg[i] * sigmoid(zg[i]);
    if (slope != nullptr) {
#pragma omp simd
      for (int64_t i = 0; i < s.group_size; ++i) {
        const T sig = sigmoid(zg[i]);
        slope[i] = sig * (T(1) + zg[i] * (T(1) - sig));
      }
    }
  }
  T squares = 0;
#pragma omp simd reduction(+ : squares)
  for (int64_t i = 0; i < s.group_size; ++i) {
    const T v = s.gate_after ? xg[i] : xg[i] * gate[i];
    squares += v * v;
  }
  return T(1) / std::sqrt(squares / T(s.group_size) + T(s.eps));
}

// Rows [begin, end) of the forward pass.
template <typename T>
void forward_rows(const Norm& s, const T* x, const T* z, const T* w, T* y, int64_t begin, int64_t end) {
  std::vector<T> gate_buffer(s.group_size, T(1));
  T* __restrict gate = gate_buffer.data();
  for (int64_t row = begin; row < end; ++row) {
    for (int64_t start = row * s.features; start < (row + 1) * s.features; start += s.group_size) {
      const T* __restrict xg = x + start;
      const T* __restrict wg = w + start % s.features;
      T* __restrict yg = y + start;
      const T r = gate_and_rstd(s, xg, z != nullptr ? z + start : nullptr, gate, static_cast<T*>(nullptr));
#pragma omp simd
      for (int64_t i = 0; i < s.group_size; ++i) {
        yg[i] = s.gate_after ? xg[i] * r * wg[i] * gate[i] : xg[i] * gate[i] * r * wg[i];
      }
    }
  }
}

// Rows [begin, end) of the backward pass; grad_w is this call's own partial sum over its rows.
template <typename T>
void backward_rows(const Norm& s, const T* gy, const T* x, const T* z, const T* w, T* gx, T* gz, T* grad_w,
                   int64_t begin, int64_t end) {
  std::vector<T> gate_buffer(s.group_size, T(1)), slope_buffer(s.group_size, T(0)), gn_buffer(s.group_size);
  T* __restrict gate = gate_buffer.data();
  T* __restrict slope = slope_buffer.data();  // silu'(z)
  T* __restrict gn = gn_buffer.data();
  for (int64_t row = begin; row < end; ++row) {
    for (int64_t start = row * s.features; start < (row + 1) * s.features; start += s.group_size) {
      const T* __restrict xg = x + start;
      const T* __restrict gyg = gy + start;
      const T* __restrict wg = w + start % s.features;
      T* __restrict gw = grad_w + start % s.features;
      T* __restrict gxg = gx + start;
      const T r = gate_and_rstd(s, xg, z != nullptr ? z + start : nullptr, gate, slope);
      T dot = 0;  // sum of gn n
#pragma omp simd reduction(+ : dot)
      for (int64_t i = 0; i < s.group_size; ++i) {
        const T n = (s.gate_after ? xg[i] : xg[i] * gate[i]) * r;
        gn[i] = s.gate_after ? gyg[i] * wg[i] * gate[i] : gyg[i] * wg[i];
        gw[i] += s.gate_after ? gyg[i] * n * gate[i] : gyg[i] * n;
        dot += gn[i] * n;
      }
      const T mean_dot = dot / T(s.group_size);
#pragma omp simd
      for (int64_t i = 0; i < s.group_size; ++i) {
        const T n = (s.gate_after ? xg[i] : xg[i] * gate[i]) * r;
        const T gv = r * (gn[i] - n * mean_dot);
        gxg[i] = s.gate_after ? gv : gv * gate[i];
        if (gz != nullptr) {
          // the gate's gradient: through v = x s before the norm, through y = n w s after it
          gz[start + i] = (s.gate_after ? gyg[i] * n * wg[i] : gv * xg[i]) * slope[i];
        }
      }
    }
  }
}

Norm check_all(const torch::Tensor& x, const torch::Tensor& w, const std::optional<torch::Tensor>& z, double eps,
               int64_t group_size, bool norm_before_gate) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && w.is_contiguous(), "contiguous CPU tensors only");
  TORCH_CHECK(x.dim() >= 1 && w.dim() == 1 && w.size(0) == x.size(-1), "weight must be [features]");
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), "mixed dtypes");
  if (z.has_value()) {
    TORCH_CHECK(z->is_contiguous() && z->sizes() == x.sizes() && z->scalar_type() == x.scalar_type(),
                "z must be contiguous and match x");
  }
  const int64_t features = x.size(-1);
  TORCH_CHECK(group_size > 0 && features % group_size == 0, "group_size must divide the features");
  return Norm{features ? x.numel() / features : 0, features, group_size, eps, norm_before_gate};
}

torch::Tensor forward(torch::Tensor x, torch::Tensor w, std::optional<torch::Tensor> z, double eps,
                      int64_t group_size, bool norm_before_gate) {
  const Norm s = check_all(x, w, z, eps, group_size, norm_before_gate);
  auto y = torch::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rmsnorm_gated_cpu_forward", [&] {
    const scalar_t* zp = z.has_value() ? z->data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, s.rows, 64, [&](int64_t begin, int64_t end) {
      forward_rows<scalar_t>(s, x.data_ptr<scalar_t>(), zp, w.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), begin,
                             end);
    });
  });
  return y;
}

// Returns grad_x, grad_weight and grad_z (undefined without z).
std::vector<torch::Tensor> backward(torch::Tensor grad_y, torch::Tensor x, torch::Tensor w,
                                    std::optional<torch::Tensor> z, double eps, int64_t group_size,
                                    bool norm_before_gate) {
  const Norm s = check_all(x, w, z, eps, group_size, norm_before_gate);
  TORCH_CHECK(grad_y.is_contiguous() && grad_y.sizes() == x.sizes() && grad_y.scalar_type() == x.scalar_type(),
              "grad_y must be contiguous and match x");
  auto grad_x = torch::empty_like(x);
  torch::Tensor grad_z = z.has_value() ? torch::empty_like(x) : torch::Tensor();
  // One partial weight gradient per slice of rows, summed after: the slices run in parallel.
  const int64_t slices = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), s.rows));
  auto grad_w_parts = torch::zeros({slices, s.features}, w.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rmsnorm_gated_cpu_backward", [&] {
    const scalar_t* zp = z.has_value() ? z->data_ptr<scalar_t>() : nullptr;
    scalar_t* gzp = z.has_value() ? grad_z.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, slices, 1, [&](int64_t first, int64_t last) {
      for (int64_t slice = first; slice < last; ++slice) {
        backward_rows<scalar_t>(s, grad_y.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), zp, w.data_ptr<scalar_t>(),
                                grad_x.data_ptr<scalar_t>(), gzp, grad_w_parts.data_ptr<scalar_t>() + slice * s.features,
                                s.rows * slice / slices, s.rows * (slice + 1) / slices);
      }
    });
  });
  return {grad_x, grad_w_parts.sum(0), grad_z};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "gated RMSNorm (CPU)");
  m.def("backward", &backward, "gradients of the gated RMSNorm (CPU)");
}
