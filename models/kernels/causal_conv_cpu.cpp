// Depthwise causal 1-D convolution on the CPU, time-major, with causal_conv.py's semantics:
//   out[b, t, d] = act(bias[d] + sum_k w[k, d] * x[b, t - (width - 1) + k, d]),   x[b, < 0, d] = 0
// act is the identity, SiLU or Hardswish (kActivation*). x is [batch, seqlen, dim] with unit stride along dim and any stride along batch
// and time (the callers' x is a column block of a projection's output, used in place); the weight comes
// transposed, [width, dim], so every tap is a contiguous vector over channels and the inner loops vectorise.
//
// Why not oneDNN's depthwise convolution (the torch twin): its backward pass took 3-6x as long as its forward
// pass at the models' sizes (2048 rows x 50 steps x 80-192 channels), 9-12% of a TiM4Rec training batch. Here
// both passes stream each tensor once per tap from the cache. The activation is fused, so its input is never
// stored: the backward recomputes it (the official SSD configurations' Hardswish convolutions then cost no extra
// pass over memory either way).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_common.h"

namespace {

constexpr int64_t kActivationNone = 0, kActivationSilu = 1, kActivationHardswish = 2;

using harness::hardswish;
using harness::hardswish_slope;
using harness::sigmoid;

// pre[d] = bias[d] + sum over taps of w[k, d] * x[t - (width - 1) + k, d], for one row's time step t.
template <typename T>
inline void preactivation(const T* __restrict x_row, int64_t stride_t, const T* __restrict w, const T* bias,
                          T* __restrict pre, int64_t t, int64_t dim, int64_t width) {
  for (int64_t d = 0; d < dim; ++d) pre[d] = bias != nullptr ? bias[d] : T(0);
  for (int64_t k = std::max<int64_t>(0, width - 1 - t); k < width; ++k) {
    const T* __restrict x_t = x_row + (t - (width - 1) + k) * stride_t;
    const T* __restrict w_k = w + k * dim;
    for (int64_t d = 0; d < dim; ++d) pre[d] += w_k[d] * x_t[d];
  }
}

// ---- one channel (TiM4Rec's time path, a [batch, 1, seqlen] input): the per-step loops of forward_rows and
// backward_rows would run over one element per step, so these run over time instead, tap by tap, vectorised along
// the row.

// pre[t] = bias + sum over taps of w[k] * x[t - (width - 1) + k], for one row's every step.
template <typename T>
inline void preactivation_row(const T* __restrict x_row, int64_t stride_t, const T* __restrict w, const T* bias,
                              T* __restrict pre, int64_t seqlen, int64_t width) {
  const T start = bias != nullptr ? bias[0] : T(0);
  for (int64_t t = 0; t < seqlen; ++t) pre[t] = start;
  for (int64_t k = 0; k < width; ++k) {
    const int64_t shift = width - 1 - k;  // tap k reads step t - shift
    const T w_k = w[k];
#pragma omp simd
    for (int64_t t = shift; t < seqlen; ++t) pre[t] += w_k * x_row[(t - shift) * stride_t];
  }
}

template <typename T>
void forward_one_channel(const T* x, int64_t stride_b, int64_t stride_t, const T* w, const T* bias,
                         int64_t activation, T* out, int64_t begin, int64_t end, int64_t seqlen, int64_t width) {
  for (int64_t b = begin; b < end; ++b) {
    T* __restrict o = out + b * seqlen;
    preactivation_row(x + b * stride_b, stride_t, w, bias, o, seqlen, width);
    if (activation == kActivationSilu) {
      for (int64_t t = 0; t < seqlen; ++t) o[t] *= sigmoid(o[t]);
    } else if (activation == kActivationHardswish) {
      for (int64_t t = 0; t < seqlen; ++t) o[t] = hardswish(o[t]);
    }
  }
}

template <typename T>
void backward_one_channel(const T* grad_out, const T* x, int64_t stride_b, int64_t stride_t, const T* w,
                          const T* bias, int64_t activation, T* grad_x, T* grad_w, T* grad_bias, int64_t begin,
                          int64_t end, int64_t seqlen, int64_t width) {
  std::vector<T> buffer(seqlen);
  T* __restrict gp = buffer.data();  // the gradient before the activation
  for (int64_t b = begin; b < end; ++b) {
    const T* __restrict x_row = x + b * stride_b;
    const T* __restrict g = grad_out + b * seqlen;
    if (activation == kActivationNone) {
      for (int64_t t = 0; t < seqlen; ++t) gp[t] = g[t];
    } else {
      preactivation_row(x_row, stride_t, w, bias, gp, seqlen, width);  // gp holds pre until overwritten
      if (activation == kActivationSilu) {
        for (int64_t t = 0; t < seqlen; ++t) {
          const T s = sigmoid(gp[t]);
          gp[t] = g[t] * s * (T(1) + gp[t] * (T(1) - s));
        }
      } else {
        for (int64_t t = 0; t < seqlen; ++t) gp[t] = g[t] * hardswish_slope(gp[t]);
      }
    }
    T bias_sum = T(0);
    for (int64_t t = 0; t < seqlen; ++t) bias_sum += gp[t];
    grad_bias[0] += bias_sum;
    T* __restrict gx = grad_x + b * seqlen;
    for (int64_t t = 0; t < seqlen; ++t) gx[t] = T(0);
    for (int64_t k = 0; k < width; ++k) {
      const int64_t shift = width - 1 - k;  // output step t + shift read input step t through tap k
      const T w_k = w[k];
      T w_sum = T(0);
#pragma omp simd reduction(+ : w_sum)
      for (int64_t t = 0; t < seqlen - shift; ++t) {
        gx[t] += w_k * gp[t + shift];
        w_sum += gp[t + shift] * x_row[t * stride_t];
      }
      grad_w[k] += w_sum;
    }
  }
}

template <typename T>
void forward_rows(const T* x, int64_t stride_b, int64_t stride_t, const T* w, const T* bias, int64_t activation,
                  T* out, int64_t begin, int64_t end, int64_t seqlen, int64_t dim, int64_t width) {
  if (dim == 1) return forward_one_channel(x, stride_b, stride_t, w, bias, activation, out, begin, end, seqlen, width);
  for (int64_t b = begin; b < end; ++b) {
    for (int64_t t = 0; t < seqlen; ++t) {
      T* __restrict o = out + (b * seqlen + t) * dim;
      preactivation(x + b * stride_b, stride_t, w, bias, o, t, dim, width);
      if (activation == kActivationSilu) {
        for (int64_t d = 0; d < dim; ++d) o[d] *= sigmoid(o[d]);
      } else if (activation == kActivationHardswish) {
        for (int64_t d = 0; d < dim; ++d) o[d] = hardswish(o[d]);
      }
    }
  }
}

// Rows [begin, end): grad_x for those rows, and their sums into this slice's grad_w [width, dim] and grad_bias.
template <typename T>
void backward_rows(const T* grad_out, const T* x, int64_t stride_b, int64_t stride_t, const T* w, const T* bias,
                   int64_t activation, T* grad_x, T* grad_w, T* grad_bias, int64_t begin, int64_t end,
                   int64_t seqlen, int64_t dim, int64_t width) {
  if (dim == 1) {
    return backward_one_channel(grad_out, x, stride_b, stride_t, w, bias, activation, grad_x, grad_w, grad_bias,
                                begin, end, seqlen, width);
  }
  std::vector<T> buffer(seqlen * dim + dim);
  T* __restrict grad_pre = buffer.data();  // [seqlen, dim]: the gradient before the activation
  T* __restrict pre = grad_pre + seqlen * dim;
  for (int64_t b = begin; b < end; ++b) {
    const T* x_row = x + b * stride_b;
    for (int64_t t = 0; t < seqlen; ++t) {
      const T* __restrict g = grad_out + (b * seqlen + t) * dim;
      T* __restrict gp = grad_pre + t * dim;
      if (activation == kActivationSilu) {
        preactivation(x_row, stride_t, w, bias, pre, t, dim, width);
        for (int64_t d = 0; d < dim; ++d) {
          const T s = sigmoid(pre[d]);
          gp[d] = g[d] * s * (T(1) + pre[d] * (T(1) - s));
        }
      } else if (activation == kActivationHardswish) {
        preactivation(x_row, stride_t, w, bias, pre, t, dim, width);
        for (int64_t d = 0; d < dim; ++d) gp[d] = g[d] * hardswish_slope(pre[d]);
      } else {
        for (int64_t d = 0; d < dim; ++d) gp[d] = g[d];
      }
      for (int64_t d = 0; d < dim; ++d) grad_bias[d] += gp[d];
    }
    for (int64_t t = 0; t < seqlen; ++t) {
      // Output step t + (width - 1 - k) read input step t through tap k.
      T* __restrict gx = grad_x + (b * seqlen + t) * dim;
      const T* __restrict x_t = x_row + t * stride_t;
      for (int64_t d = 0; d < dim; ++d) gx[d] = T(0);
      for (int64_t k = 0; k < width; ++k) {
        const int64_t out_t = t + (width - 1 - k);
        if (out_t >= seqlen) continue;
        const T* __restrict gp = grad_pre + out_t * dim;
        const T* __restrict w_k = w + k * dim;
        T* __restrict gw_k = grad_w + k * dim;
        for (int64_t d = 0; d < dim; ++d) {
          gx[d] += w_k[d] * gp[d];
          gw_k[d] += gp[d] * x_t[d];
        }
      }
    }
  }
}

void check_x(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& bias,
             int64_t activation) {
  TORCH_CHECK(activation >= kActivationNone && activation <= kActivationHardswish, "unknown activation code");
  // (a single channel may have any stride: it is only ever read at offset 0)
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 3 && (x.stride(2) == 1 || x.size(2) == 1),
              "x must be a CPU [batch, seqlen, dim] tensor with unit stride along dim");
  TORCH_CHECK(w.dim() == 2 && w.size(1) == x.size(2) && w.is_contiguous() && w.scalar_type() == x.scalar_type(),
              "weight must be a contiguous [width, dim] tensor of x's dtype");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == x.size(2) && bias->is_contiguous() &&
                    bias->scalar_type() == x.scalar_type(),
                "bias must be a contiguous [dim] tensor of x's dtype");
  }
}

torch::Tensor forward(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias, int64_t activation) {
  check_x(x, w, bias, activation);
  const int64_t batch = x.size(0), seqlen = x.size(1), dim = x.size(2), width = w.size(0);
  auto out = torch::empty({batch, seqlen, dim}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "causal_conv_cpu_forward", [&] {
    const scalar_t* bias_data = bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      forward_rows<scalar_t>(x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), w.data_ptr<scalar_t>(), bias_data,
                             activation, out.data_ptr<scalar_t>(), begin, end, seqlen, dim, width);
    });
  });
  return out;
}

// Returns grad_x [batch, seqlen, dim], grad_w [width, dim] and grad_bias [dim] (summed even without a bias).
std::vector<torch::Tensor> backward(torch::Tensor grad_out, torch::Tensor x, torch::Tensor w,
                                    c10::optional<torch::Tensor> bias, int64_t activation) {
  check_x(x, w, bias, activation);
  const int64_t batch = x.size(0), seqlen = x.size(1), dim = x.size(2), width = w.size(0);
  TORCH_CHECK(grad_out.is_contiguous() && grad_out.sizes() == x.sizes() && grad_out.scalar_type() == x.scalar_type(),
              "grad_out must be a contiguous tensor of x's shape and dtype");
  auto grad_x = torch::empty({batch, seqlen, dim}, x.options());
  // One partial grad_w and grad_bias per slice of rows, summed after: the slices run in parallel.
  const int64_t slices = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), batch));
  auto grad_w_parts = torch::zeros({slices, width, dim}, x.options());
  auto grad_bias_parts = torch::zeros({slices, dim}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "causal_conv_cpu_backward", [&] {
    const scalar_t* bias_data = bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, slices, 1, [&](int64_t first, int64_t last) {
      for (int64_t slice = first; slice < last; ++slice) {
        backward_rows<scalar_t>(grad_out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), x.stride(0), x.stride(1),
                                w.data_ptr<scalar_t>(), bias_data, activation, grad_x.data_ptr<scalar_t>(),
                                grad_w_parts.data_ptr<scalar_t>() + slice * width * dim,
                                grad_bias_parts.data_ptr<scalar_t>() + slice * dim, batch * slice / slices,
                                batch * (slice + 1) / slices, seqlen, dim, width);
      }
    });
  });
  return {grad_x, grad_w_parts.sum(0), grad_bias_parts.sum(0)};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "depthwise causal convolution, time-major (CPU)");
  m.def("backward", &backward, "gradients of the depthwise causal convolution (CPU)");
}
