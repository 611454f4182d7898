// Mamba1 selective scan on the CPU, one (batch row, channel) sequence at a time.
//
// The torch twin (selective_scan.py) runs the recurrence as whole-tensor steps, so every step streams a
// batch*dim*dstate state through memory a dozen times; here one sequence's state (dstate values) lives in
// registers and its recomputed history (seqlen*dstate values) in the L1/L2 cache, and the inner loop over the
// state axis is vectorised, exp included (glibc's libmvec, enabled by -ffast-math).
//
// Semantics, shapes and names follow selective_scan.py: u, delta [batch, dim, seqlen] (delta after bias and
// softplus), A [dim, dstate], B, C [batch, seqlen, dstate] (time-major within a row, so one step is contiguous).
//   h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t,   y_t = C_t . h_t
// The backward pass recomputes a sequence's states from zero (no checkpoints are kept) and runs the adjoint
// lam_t = g_t C_t + exp(delta_{t+1} A) lam_{t+1} backwards in time.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_common.h"

namespace {

using harness::FlushSubnormals;


// Batch rows [begin, end) of the forward scan.
template <typename T>
void forward_rows(const T* u, const T* delta, const T* A, const T* B, const T* C, T* y, int64_t begin, int64_t end,
                  int64_t dim, int64_t seqlen, int64_t dstate) {
  std::vector<T> state_buffer(dstate);
  T* __restrict h = state_buffer.data();
  for (int64_t b = begin; b < end; ++b) {
    const T* B_row = B + b * seqlen * dstate;
    const T* C_row = C + b * seqlen * dstate;
    for (int64_t d = 0; d < dim; ++d) {
      const int64_t seq = (b * dim + d) * seqlen;
      const T* __restrict A_d = A + d * dstate;
      for (int64_t n = 0; n < dstate; ++n) h[n] = 0;
      for (int64_t t = 0; t < seqlen; ++t) {
        const T step = delta[seq + t];
        const T x = step * u[seq + t];
        const T* __restrict B_t = B_row + t * dstate;
        const T* __restrict C_t = C_row + t * dstate;
        T out = 0;
#pragma omp simd reduction(+ : out)
        for (int64_t n = 0; n < dstate; ++n) {
          const T next = std::exp(step * A_d[n]) * h[n] + x * B_t[n];
          h[n] = next;
          out += next * C_t[n];
        }
        y[seq + t] = out;
      }
    }
  }
}

// Batch rows [begin, end) of the backward scan. grad_B and grad_C rows are owned by this call (summed over the
// channels here); grad_A is this call's own partial sum over its rows.
template <typename T>
void backward_rows(const T* grad_y, const T* u, const T* delta, const T* A, const T* B, const T* C, T* grad_u,
                   T* grad_delta, T* grad_A, T* grad_B, T* grad_C, int64_t begin, int64_t end, int64_t dim,
                   int64_t seqlen, int64_t dstate) {
  // states[t + 1] = h_t (states[0] = h_{-1} = 0), decays[t] = exp(delta_t A)
  std::vector<T> states_buffer((seqlen + 1) * dstate), decays_buffer(seqlen * dstate), adjoint_buffer(dstate);
  T* __restrict states = states_buffer.data();
  T* __restrict decays = decays_buffer.data();
  T* __restrict lam = adjoint_buffer.data();
  for (int64_t b = begin; b < end; ++b) {
    const T* B_row = B + b * seqlen * dstate;
    const T* C_row = C + b * seqlen * dstate;
    T* grad_B_row = grad_B + b * seqlen * dstate;
    T* grad_C_row = grad_C + b * seqlen * dstate;
    for (int64_t d = 0; d < dim; ++d) {
      const int64_t seq = (b * dim + d) * seqlen;
      const T* __restrict A_d = A + d * dstate;
      T* __restrict grad_A_d = grad_A + d * dstate;
      for (int64_t n = 0; n < dstate; ++n) states[n] = 0;
      for (int64_t t = 0; t < seqlen; ++t) {
        const T step = delta[seq + t];
        const T x = step * u[seq + t];
        const T* __restrict B_t = B_row + t * dstate;
        const T* __restrict prev = states + t * dstate;
        T* __restrict next = states + (t + 1) * dstate;
        T* __restrict decay = decays + t * dstate;
#pragma omp simd
        for (int64_t n = 0; n < dstate; ++n) {
          decay[n] = std::exp(step * A_d[n]);
          next[n] = decay[n] * prev[n] + x * B_t[n];
        }
      }
      for (int64_t n = 0; n < dstate; ++n) lam[n] = 0;  // carries exp(delta_{t+1} A) lam_{t+1}
      for (int64_t t = seqlen - 1; t >= 0; --t) {
        const T g = grad_y[seq + t];
        const T step = delta[seq + t];
        const T x = step * u[seq + t];
        const T* __restrict B_t = B_row + t * dstate;
        const T* __restrict C_t = C_row + t * dstate;
        const T* __restrict h_prev = states + t * dstate;
        const T* __restrict h = states + (t + 1) * dstate;
        const T* __restrict decay = decays + t * dstate;
        T* __restrict grad_B_t = grad_B_row + t * dstate;
        T* __restrict grad_C_t = grad_C_row + t * dstate;
        T grad_x = 0, grad_step = 0;
#pragma omp simd reduction(+ : grad_x, grad_step)
        for (int64_t n = 0; n < dstate; ++n) {
          const T adjoint = lam[n] + g * C_t[n];  // lam_t
          grad_C_t[n] += g * h[n];
          grad_B_t[n] += x * adjoint;
          grad_x += adjoint * B_t[n];
          const T decayed = adjoint * decay[n];
          const T v = decayed * h_prev[n];  // gradient of the log-decay delta_t A
          grad_step += v * A_d[n];
          grad_A_d[n] += step * v;
          lam[n] = decayed;
        }
        // x = delta * u: its gradient flows to both.
        grad_u[seq + t] = grad_x * step;
        grad_delta[seq + t] = grad_step + grad_x * u[seq + t];
      }
    }
  }
}

void check(const torch::Tensor& t, const char* name, int64_t dims) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.dim() == dims, name, " must have ", dims, " dimensions");
}

void check_all(const torch::Tensor& u, const torch::Tensor& delta, const torch::Tensor& A, const torch::Tensor& B,
               const torch::Tensor& C) {
  check(u, "u", 3);
  check(delta, "delta", 3);
  check(A, "A", 2);
  check(B, "B", 3);
  check(C, "C", 3);
  TORCH_CHECK(delta.sizes() == u.sizes(), "delta must have the shape of u");
  TORCH_CHECK(A.size(0) == u.size(1), "A must be [dim, dstate]");
  const std::vector<int64_t> time_major{u.size(0), u.size(2), A.size(1)};
  TORCH_CHECK(B.sizes() == time_major && C.sizes() == time_major, "B and C must be [batch, seqlen, dstate]");
  for (const auto* t : {&delta, &A, &B, &C}) TORCH_CHECK(t->scalar_type() == u.scalar_type(), "mixed dtypes");
}

torch::Tensor forward(torch::Tensor u, torch::Tensor delta, torch::Tensor A, torch::Tensor B, torch::Tensor C) {
  check_all(u, delta, A, B, C);
  const int64_t batch = u.size(0), dim = u.size(1), seqlen = u.size(2), dstate = A.size(1);
  auto y = torch::empty_like(u);
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_cpu_forward", [&] {
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      FlushSubnormals flushed;
      forward_rows<scalar_t>(u.data_ptr<scalar_t>(), delta.data_ptr<scalar_t>(), A.data_ptr<scalar_t>(),
                             B.data_ptr<scalar_t>(), C.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), begin, end, dim,
                             seqlen, dstate);
    });
  });
  return y;
}

// Returns grad_u, grad_delta (with respect to the delta given, after bias and softplus), grad_A, grad_B, grad_C.
std::vector<torch::Tensor> backward(torch::Tensor grad_y, torch::Tensor u, torch::Tensor delta, torch::Tensor A,
                                    torch::Tensor B, torch::Tensor C) {
  check_all(u, delta, A, B, C);
  check(grad_y, "grad_y", 3);
  TORCH_CHECK(grad_y.sizes() == u.sizes() && grad_y.scalar_type() == u.scalar_type(), "grad_y must match u");
  const int64_t batch = u.size(0), dim = u.size(1), seqlen = u.size(2), dstate = A.size(1);
  auto grad_u = torch::empty_like(u);
  auto grad_delta = torch::empty_like(u);
  auto grad_B = torch::zeros_like(B);
  auto grad_C = torch::zeros_like(C);
  // One partial grad_A per slice of rows, summed after: the slices run in parallel.
  const int64_t slices = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), batch));
  auto grad_A_parts = torch::zeros({slices, dim, dstate}, A.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_cpu_backward", [&] {
    at::parallel_for(0, slices, 1, [&](int64_t first, int64_t last) {
      FlushSubnormals flushed;
      for (int64_t slice = first; slice < last; ++slice) {
        backward_rows<scalar_t>(
            grad_y.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(), delta.data_ptr<scalar_t>(), A.data_ptr<scalar_t>(),
            B.data_ptr<scalar_t>(), C.data_ptr<scalar_t>(), grad_u.data_ptr<scalar_t>(),
            grad_delta.data_ptr<scalar_t>(), grad_A_parts.data_ptr<scalar_t>() + slice * dim * dstate, grad_B.data_ptr<scalar_t>(),
            grad_C.data_ptr<scalar_t>(), batch * slice / slices, batch * (slice + 1) / slices, dim, seqlen, dstate);
      }
    });
  });
  return {grad_u, grad_delta, grad_A_parts.sum(0), grad_B, grad_C};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "selective scan y = scan(u, delta, A, B, C) (CPU)");
  m.def("backward", &backward, "gradients of the selective scan (CPU)");
}
