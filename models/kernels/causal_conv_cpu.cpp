// Depthwise causal 1-D convolution on the CPU, with causal_conv.py's semantics:
//   out[b, d, t] = act(start[min(t, width - 1), d] + sum_k w[k, d] * x[b, d, t - (width - 1) + k]),
//   x[b, d, < 0] = 0
// act is the identity, SiLU or Hardswish (kActivation*); the weight comes transposed, [width, dim], so every tap is
// a contiguous vector over channels. `start` [width, dim] holds the convolution's bias, plus what a bias of its
// input adds at each step (causal_conv.py): the first width - 1 steps see fewer taps of the input than the rest. Two layouts, chosen by the caller (causal_conv.py):
// - time-major: x [batch, seqlen, dim] with unit stride along dim and any stride along batch and time (the SSD and
//   Mamba blocks' x is a column block of a projection's output, used in place); out [batch, seqlen, dim]. The loops
//   run over channels.
// - along time: x [batch, dim, seqlen] with any strides, out [batch, dim, seqlen] contiguous. The loops run over
//   time, one channel at a time: for few channels (TiM4Rec's time path has one per head, 4 in the released
//   configurations), where a vector over channels would be mostly empty, and for x without unit channel stride.
//
// Why not oneDNN's depthwise convolution (the torch twin): its backward pass took 3-6x as long as its forward
// pass at the models' sizes (2048 rows x 50 steps x 80-192 channels), 9-12% of a TiM4Rec training batch. Here
// both passes stream each tensor once per tap from the cache. The activation is fused, so its input is never stored: the
// backward recomputes it (the official SSD configurations' Hardswish convolutions then cost no extra pass over
// memory either way).

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

// ---- along time: rows of one channel, vectorised along the row.

// pre[t] = start[min(t, width - 1)] + sum over taps of w[k] * x[t - (width - 1) + k], for one row's every step; the
// row's taps are w[k * dim] and its starts start[k * dim].
template <typename T>
inline void preactivation_row(const T* __restrict x_row, int64_t stride_t, const T* __restrict w,
                              const T* __restrict start, int64_t dim, T* __restrict pre, int64_t seqlen,
                              int64_t width) {
  const int64_t ramp = std::min(seqlen, width - 1);  // the steps before every tap reads the input
  for (int64_t t = 0; t < ramp; ++t) pre[t] = start[t * dim];
  const T steady = start[(width - 1) * dim];
  for (int64_t t = ramp; t < seqlen; ++t) pre[t] = steady;
  for (int64_t k = 0; k < width; ++k) {
    const int64_t shift = width - 1 - k;  // tap k reads step t - shift
    const T w_k = w[k * dim];
#pragma omp simd
    for (int64_t t = shift; t < seqlen; ++t) pre[t] += w_k * x_row[(t - shift) * stride_t];
  }
}

// Rows (b, d) for b in [begin, end): out[b, d, :] (contiguous [batch, dim, seqlen]).
template <typename T>
void forward_rows_along_time(const T* x, int64_t stride_b, int64_t stride_d, int64_t stride_t, const T* w,
                             const T* start, int64_t activation, T* out, int64_t begin, int64_t end, int64_t seqlen,
                             int64_t dim, int64_t width) {
  for (int64_t b = begin; b < end; ++b) {
    for (int64_t d = 0; d < dim; ++d) {
      T* __restrict o = out + (b * dim + d) * seqlen;
      preactivation_row(x + b * stride_b + d * stride_d, stride_t, w + d, start + d, dim, o, seqlen, width);
      if (activation == kActivationSilu) {
        for (int64_t t = 0; t < seqlen; ++t) o[t] *= sigmoid(o[t]);
      } else if (activation == kActivationHardswish) {
        for (int64_t t = 0; t < seqlen; ++t) o[t] = hardswish(o[t]);
      }
    }
  }
}

// Rows (b, d) for b in [begin, end): grad_x[b, d, :] (contiguous [batch, dim, seqlen], as grad_out), and their sums
// into this slice's grad_w and grad_start [width, dim].
template <typename T>
void backward_rows_along_time(const T* grad_out, const T* x, int64_t stride_b, int64_t stride_d, int64_t stride_t,
                              const T* w, const T* start, int64_t activation, T* grad_x, T* grad_w, T* grad_start,
                              int64_t begin, int64_t end, int64_t seqlen, int64_t dim, int64_t width) {
  std::vector<T> buffer(seqlen);
  T* __restrict gp = buffer.data();  // the gradient before the activation
  for (int64_t b = begin; b < end; ++b) {
    for (int64_t d = 0; d < dim; ++d) {
      const T* __restrict x_row = x + b * stride_b + d * stride_d;
      const T* __restrict g = grad_out + (b * dim + d) * seqlen;
      if (activation == kActivationNone) {
        for (int64_t t = 0; t < seqlen; ++t) gp[t] = g[t];
      } else {
        // gp holds pre until overwritten
        preactivation_row(x_row, stride_t, w + d, start + d, dim, gp, seqlen, width);
        if (activation == kActivationSilu) {
          for (int64_t t = 0; t < seqlen; ++t) {
            const T s = sigmoid(gp[t]);
            gp[t] = g[t] * s * (T(1) + gp[t] * (T(1) - s));
          }
        } else {
          for (int64_t t = 0; t < seqlen; ++t) gp[t] = g[t] * hardswish_slope(gp[t]);
        }
      }
      const int64_t ramp = std::min(seqlen, width - 1);
      for (int64_t t = 0; t < ramp; ++t) grad_start[t * dim + d] += gp[t];
      T steady_sum = T(0);
      for (int64_t t = ramp; t < seqlen; ++t) steady_sum += gp[t];
      grad_start[(width - 1) * dim + d] += steady_sum;
      T* __restrict gx = grad_x + (b * dim + d) * seqlen;
      for (int64_t t = 0; t < seqlen; ++t) gx[t] = T(0);
      for (int64_t k = 0; k < width; ++k) {
        const int64_t shift = width - 1 - k;  // output step t + shift read input step t through tap k
        const T w_k = w[k * dim + d];
        T w_sum = T(0);
#pragma omp simd reduction(+ : w_sum)
        for (int64_t t = 0; t < seqlen - shift; ++t) {
          gx[t] += w_k * gp[t + shift];
          w_sum += gp[t + shift] * x_row[t * stride_t];
        }
        grad_w[k * dim + d] += w_sum;
      }
    }
  }
}

// ---- time-major: vectorised over channels.

// pre[d] = start[min(t, width - 1), d] + sum over taps of w[k, d] * x[t - (width - 1) + k, d], for one row's step t.
template <typename T>
inline void preactivation(const T* __restrict x_row, int64_t stride_t, const T* __restrict w,
                          const T* __restrict start, T* __restrict pre, int64_t t, int64_t dim, int64_t width) {
  const T* __restrict start_t = start + std::min(t, width - 1) * dim;
  for (int64_t d = 0; d < dim; ++d) pre[d] = start_t[d];
  for (int64_t k = std::max<int64_t>(0, width - 1 - t); k < width; ++k) {
    const T* __restrict x_t = x_row + (t - (width - 1) + k) * stride_t;
    const T* __restrict w_k = w + k * dim;
    for (int64_t d = 0; d < dim; ++d) pre[d] += w_k[d] * x_t[d];
  }
}

template <typename T>
void forward_rows(const T* x, int64_t stride_b, int64_t stride_t, const T* w, const T* start, int64_t activation,
                  T* out, int64_t begin, int64_t end, int64_t seqlen, int64_t dim, int64_t width) {
  for (int64_t b = begin; b < end; ++b) {
    for (int64_t t = 0; t < seqlen; ++t) {
      T* __restrict o = out + (b * seqlen + t) * dim;
      preactivation(x + b * stride_b, stride_t, w, start, o, t, dim, width);
      if (activation == kActivationSilu) {
        for (int64_t d = 0; d < dim; ++d) o[d] *= sigmoid(o[d]);
      } else if (activation == kActivationHardswish) {
        for (int64_t d = 0; d < dim; ++d) o[d] = hardswish(o[d]);
      }
    }
  }
}

// Rows [begin, end): grad_x for those rows, and their sums into this slice's grad_w and grad_start [width, dim].
template <typename T>
void backward_rows(const T* grad_out, const T* x, int64_t stride_b, int64_t stride_t, const T* w, const T* start,
                   int64_t activation, T* grad_x, T* grad_w, T* grad_start, int64_t begin, int64_t end,
                   int64_t seqlen, int64_t dim, int64_t width) {
  std::vector<T> buffer(seqlen * dim + dim);
  T* __restrict grad_pre = buffer.data();  // [seqlen, dim]: the gradient before the activation
  T* __restrict pre = grad_pre + seqlen * dim;
  for (int64_t b = begin; b < end; ++b) {
    const T* x_row = x + b * stride_b;
    for (int64_t t = 0; t < seqlen; ++t) {
      const T* __restrict g = grad_out + (b * seqlen + t) * dim;
      T* __restrict gp = grad_pre + t * dim;
      if (activation == kActivationSilu) {
        preactivation(x_row, stride_t, w, start, pre, t, dim, width);
        for (int64_t d = 0; d < dim; ++d) {
          const T s = sigmoid(pre[d]);
          gp[d] = g[d] * s * (T(1) + pre[d] * (T(1) - s));
        }
      } else if (activation == kActivationHardswish) {
        preactivation(x_row, stride_t, w, start, pre, t, dim, width);
        for (int64_t d = 0; d < dim; ++d) gp[d] = g[d] * hardswish_slope(pre[d]);
      } else {
        for (int64_t d = 0; d < dim; ++d) gp[d] = g[d];
      }
      T* __restrict grad_start_t = grad_start + std::min(t, width - 1) * dim;
      for (int64_t d = 0; d < dim; ++d) grad_start_t[d] += gp[d];
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

void check_weights(const torch::Tensor& x, int64_t dim, const torch::Tensor& w, const torch::Tensor& start,
                   int64_t activation) {
  TORCH_CHECK(activation >= kActivationNone && activation <= kActivationHardswish, "unknown activation code");
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 3, "x must be a 3-d CPU tensor");
  TORCH_CHECK(w.dim() == 2 && w.size(0) >= 1 && w.size(1) == dim && w.is_contiguous() &&
                  w.scalar_type() == x.scalar_type(),
              "weight must be a contiguous [width, dim] tensor of x's dtype");
  TORCH_CHECK(start.sizes() == w.sizes() && start.is_contiguous() && start.scalar_type() == x.scalar_type(),
              "start must be a contiguous [width, dim] tensor of x's dtype");
}

void check_time_major(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& start, int64_t activation) {
  check_weights(x, x.size(2), w, start, activation);
  // (a single channel may have any stride: it is only ever read at offset 0)
  TORCH_CHECK(x.stride(2) == 1 || x.size(2) == 1, "x must be a [batch, seqlen, dim] tensor with unit stride along dim");
}

void check_grad_out(const torch::Tensor& grad_out, const torch::Tensor& x) {
  TORCH_CHECK(grad_out.is_contiguous() && grad_out.sizes() == x.sizes() && grad_out.scalar_type() == x.scalar_type(),
              "grad_out must be a contiguous tensor of x's shape and dtype");
}

// Slices of rows run in parallel, each with its own partial grad_w and grad_start, summed after.
template <typename Body>
std::vector<torch::Tensor> sliced_backward(const torch::Tensor& x, int64_t batch, int64_t width, int64_t dim,
                                           torch::Tensor grad_x, Body body) {
  const int64_t slices = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), batch));
  auto grad_w_parts = torch::zeros({slices, width, dim}, x.options());
  auto grad_start_parts = torch::zeros({slices, width, dim}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "causal_conv_cpu_backward", [&] {
    at::parallel_for(0, slices, 1, [&](int64_t first, int64_t last) {
      for (int64_t slice = first; slice < last; ++slice) {
        body(grad_w_parts.data_ptr<scalar_t>() + slice * width * dim,
             grad_start_parts.data_ptr<scalar_t>() + slice * width * dim, batch * slice / slices,
             batch * (slice + 1) / slices);
      }
    });
  });
  return {grad_x, grad_w_parts.sum(0), grad_start_parts.sum(0)};
}

// x [batch, seqlen, dim] -> out [batch, seqlen, dim].
torch::Tensor forward(torch::Tensor x, torch::Tensor w, torch::Tensor start, int64_t activation) {
  check_time_major(x, w, start, activation);
  const int64_t batch = x.size(0), seqlen = x.size(1), dim = x.size(2), width = w.size(0);
  auto out = torch::empty({batch, seqlen, dim}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "causal_conv_cpu_forward", [&] {
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      forward_rows<scalar_t>(x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), w.data_ptr<scalar_t>(),
                             start.data_ptr<scalar_t>(), activation, out.data_ptr<scalar_t>(), begin, end, seqlen,
                             dim, width);
    });
  });
  return out;
}

// Returns grad_x [batch, seqlen, dim], grad_w and grad_start [width, dim].
std::vector<torch::Tensor> backward(torch::Tensor grad_out, torch::Tensor x, torch::Tensor w, torch::Tensor start,
                                    int64_t activation) {
  check_time_major(x, w, start, activation);
  check_grad_out(grad_out, x);
  const int64_t batch = x.size(0), seqlen = x.size(1), dim = x.size(2), width = w.size(0);
  auto grad_x = torch::empty({batch, seqlen, dim}, x.options());
  return sliced_backward(x, batch, width, dim, grad_x, [&](auto* grad_w, auto* grad_start, int64_t begin, int64_t end) {
    using T = std::remove_pointer_t<decltype(grad_w)>;
    backward_rows<T>(grad_out.data_ptr<T>(), x.data_ptr<T>(), x.stride(0), x.stride(1), w.data_ptr<T>(),
                     start.data_ptr<T>(), activation, grad_x.data_ptr<T>(), grad_w, grad_start, begin, end, seqlen,
                     dim, width);
  });
}

// x [batch, dim, seqlen], any strides -> out [batch, dim, seqlen], contiguous.
torch::Tensor forward_along_time(torch::Tensor x, torch::Tensor w, torch::Tensor start, int64_t activation) {
  check_weights(x, x.size(1), w, start, activation);
  const int64_t batch = x.size(0), dim = x.size(1), seqlen = x.size(2), width = w.size(0);
  auto out = torch::empty({batch, dim, seqlen}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "causal_conv_cpu_forward_along_time", [&] {
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      forward_rows_along_time<scalar_t>(x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), x.stride(2),
                                        w.data_ptr<scalar_t>(), start.data_ptr<scalar_t>(), activation,
                                        out.data_ptr<scalar_t>(), begin, end, seqlen, dim, width);
    });
  });
  return out;
}

// Returns grad_x [batch, dim, seqlen], grad_w and grad_start [width, dim].
std::vector<torch::Tensor> backward_along_time(torch::Tensor grad_out, torch::Tensor x, torch::Tensor w,
                                               torch::Tensor start, int64_t activation) {
  check_weights(x, x.size(1), w, start, activation);
  check_grad_out(grad_out, x);
  const int64_t batch = x.size(0), dim = x.size(1), seqlen = x.size(2), width = w.size(0);
  auto grad_x = torch::empty({batch, dim, seqlen}, x.options());
  return sliced_backward(x, batch, width, dim, grad_x, [&](auto* grad_w, auto* grad_start, int64_t begin, int64_t end) {
    using T = std::remove_pointer_t<decltype(grad_w)>;
    backward_rows_along_time<T>(grad_out.data_ptr<T>(), x.data_ptr<T>(), x.stride(0), x.stride(1), x.stride(2),
                                w.data_ptr<T>(), start.data_ptr<T>(), activation, grad_x.data_ptr<T>(), grad_w,
                                grad_start, begin, end, seqlen, dim, width);
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "depthwise causal convolution, time-major (CPU)");
  m.def("backward", &backward, "gradients of the depthwise causal convolution, time-major (CPU)");
  m.def("forward_along_time", &forward_along_time, "depthwise causal convolution, one channel at a time (CPU)");
  m.def("backward_along_time", &backward_along_time, "its gradients (CPU)");
}
