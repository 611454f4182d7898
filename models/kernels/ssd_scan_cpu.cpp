// SSD (Mamba2) scan on the CPU, one (batch row, head) sequence at a time.
//
// The torch twin (ssd_scan.py) runs the chunked block decomposition as whole-tensor products, which at the
// models' sizes streams [batch, chunks, heads, chunk, chunk] decay and score tensors through memory a dozen
// times. The decay here is a scalar per head and step, so the plain recurrence is cheap: one exp per (row, head,
// step), and a [headdim, dstate] state (4 KiB at 32 x 32) that stays in the L1 cache while the loops over the
// state axis are vectorised. Exact like the chunked form (the same sums in another order), for any chunk size.
//
// Semantics, shapes and names follow ssd_scan.py, with dt already biased and softplus'd (the step):
//   x [batch, seqlen, nheads, headdim], step [batch, seqlen, nheads], A [nheads],
//   B, C [batch, seqlen, ngroups, dstate], head h reads group h / (nheads / ngroups);
//   H_t = exp(step_t A) H_{t-1} + step_t x_t B_t^T,   y_t = H_t C_t + D x_t     (H_{-1} = 0)
// with the skip D x inside (D one value per channel, zeros for none): as a separate torch multiply and add it
// was two passes over [batch, seqlen, nheads, headdim] each way.
// The backward pass recomputes a sequence's states from zero and runs the adjoint
// lam_t = g_t C_t^T + exp(step_{t+1} A) lam_{t+1} backwards in time, both up to the row's last step with an output
// gradient (harness::steps_reached: under prefix training, the row's last item, not the batch's longest row).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_common.h"

namespace {

using harness::FlushSubnormals;


// x, B and C (and their gradients) are read and written through their batch and time strides, with each step's
// [nheads, headdim] or [ngroups, dstate] block contiguous: an SSD block passes the column blocks of its convolved
// projection xBC in place, and receives their gradients in one [batch, seqlen, width] tensor (no copies either way).
struct Shape {
  int64_t batch, seqlen, nheads, headdim, ngroups, dstate;
  int64_t x_sb, x_st;    // strides of x along batch and time
  int64_t bc_sb, bc_st;  // strides of B and C along batch and time
  int64_t group(int64_t h) const { return h / (nheads / ngroups); }
  // offsets of (b, t, h, 0) in x, of (b, t, h, 0) in y (contiguous), of (b, t, h) in step, of (b, t, g, 0) in B and C
  int64_t x_at(int64_t b, int64_t t, int64_t h) const { return b * x_sb + t * x_st + h * headdim; }
  int64_t y_at(int64_t b, int64_t t, int64_t h) const { return ((b * seqlen + t) * nheads + h) * headdim; }
  int64_t step_at(int64_t b, int64_t t, int64_t h) const { return (b * seqlen + t) * nheads + h; }
  int64_t bc_at(int64_t b, int64_t t, int64_t g) const { return b * bc_sb + t * bc_st + g * dstate; }
};

// Batch rows [begin, end) of the forward scan.
template <typename T>
void forward_rows(const Shape& s, const T* x, const T* step, const T* A, const T* B, const T* C, const T* D, T* y,
                  int64_t begin, int64_t end) {
  std::vector<T> state_buffer(s.headdim * s.dstate);
  T* __restrict state = state_buffer.data();
  for (int64_t b = begin; b < end; ++b) {
    for (int64_t h = 0; h < s.nheads; ++h) {
      std::fill(state_buffer.begin(), state_buffer.end(), T(0));
      for (int64_t t = 0; t < s.seqlen; ++t) {
        const T dt = step[s.step_at(b, t, h)];
        const T decay = std::exp(dt * A[h]);
        const T* __restrict x_t = x + s.x_at(b, t, h);
        const T* __restrict B_t = B + s.bc_at(b, t, s.group(h));
        const T* __restrict C_t = C + s.bc_at(b, t, s.group(h));
        const T* __restrict D_h = D + h * s.headdim;
        T* __restrict y_t = y + s.y_at(b, t, h);
        for (int64_t p = 0; p < s.headdim; ++p) {
          const T input = dt * x_t[p];
          T* __restrict row = state + p * s.dstate;
          T out = 0;
#pragma omp simd reduction(+ : out)
          for (int64_t n = 0; n < s.dstate; ++n) {
            const T next = decay * row[n] + input * B_t[n];
            row[n] = next;
            out += next * C_t[n];
          }
          y_t[p] = out + D_h[p] * x_t[p];
        }
      }
    }
  }
}

// Batch rows [begin, end) of the backward scan. grad_B and grad_C rows are owned by this call (summed over the
// heads of a group here); grad_A is this call's own partial sum over its rows.
template <typename T>
void backward_rows(const Shape& s, const T* grad_y, const T* x, const T* step, const T* A, const T* B, const T* C,
                   const T* D, T* grad_x, T* grad_step, T* grad_A, T* grad_B, T* grad_C, T* grad_D, int64_t begin,
                   int64_t end) {
  const int64_t size = s.headdim * s.dstate;
  // states[t + 1] = H_t (states[0] = H_{-1} = 0), decays[t] = exp(step_t A)
  std::vector<T> states_buffer((s.seqlen + 1) * size), decays_buffer(s.seqlen), adjoint_buffer(size);
  T* __restrict states = states_buffer.data();
  T* __restrict decays = decays_buffer.data();
  T* __restrict lam = adjoint_buffer.data();
  const int64_t row_width = s.nheads * s.headdim;
  for (int64_t b = begin; b < end; ++b) {
    // steps past the row's last output gradient produce zeros: neither recomputed nor run backwards
    const int64_t reached = harness::steps_reached(grad_y + s.y_at(b, 0, 0), row_width, row_width, s.seqlen);
    const int64_t bc_width = s.ngroups * s.dstate;
    for (int64_t t = 0; t < s.seqlen; ++t) {  // B's and C's gradients are summed over the heads of a group below
      std::fill(grad_B + s.bc_at(b, t, 0), grad_B + s.bc_at(b, t, 0) + bc_width, T(0));
      std::fill(grad_C + s.bc_at(b, t, 0), grad_C + s.bc_at(b, t, 0) + bc_width, T(0));
    }
    for (int64_t t = reached; t < s.seqlen; ++t) {
      std::fill(grad_x + s.x_at(b, t, 0), grad_x + s.x_at(b, t, 0) + row_width, T(0));
      std::fill(grad_step + s.step_at(b, t, 0), grad_step + s.step_at(b, t, 0) + s.nheads, T(0));
    }
    for (int64_t h = 0; h < s.nheads; ++h) {
      const int64_t g = s.group(h);
      std::fill(states, states + size, T(0));
      for (int64_t t = 0; t < reached; ++t) {
        const T dt = step[s.step_at(b, t, h)];
        const T decay = decays[t] = std::exp(dt * A[h]);
        const T* __restrict x_t = x + s.x_at(b, t, h);
        const T* __restrict B_t = B + s.bc_at(b, t, g);
        const T* __restrict prev = states + t * size;
        T* __restrict next = states + (t + 1) * size;
        for (int64_t p = 0; p < s.headdim; ++p) {
          const T input = dt * x_t[p];
#pragma omp simd
          for (int64_t n = 0; n < s.dstate; ++n) {
            next[p * s.dstate + n] = decay * prev[p * s.dstate + n] + input * B_t[n];
          }
        }
      }
      std::fill(lam, lam + size, T(0));  // carries exp(step_{t+1} A) lam_{t+1}
      for (int64_t t = reached - 1; t >= 0; --t) {
        const T dt = step[s.step_at(b, t, h)];
        const T decay = decays[t];
        const T* __restrict x_t = x + s.x_at(b, t, h);
        const T* __restrict g_t = grad_y + s.y_at(b, t, h);
        const T* __restrict D_h = D + h * s.headdim;
        T* __restrict grad_D_h = grad_D + h * s.headdim;
        const T* __restrict B_t = B + s.bc_at(b, t, g);
        const T* __restrict C_t = C + s.bc_at(b, t, g);
        const T* __restrict h_prev = states + t * size;
        const T* __restrict h_now = states + (t + 1) * size;
        T* __restrict grad_x_t = grad_x + s.x_at(b, t, h);
        T* __restrict grad_B_t = grad_B + s.bc_at(b, t, g);
        T* __restrict grad_C_t = grad_C + s.bc_at(b, t, g);
        T log_decay_grad = 0, input_grad_dot_x = 0;
        for (int64_t p = 0; p < s.headdim; ++p) {
          const T gy = g_t[p];
          const T input = dt * x_t[p];
          const int64_t o = p * s.dstate;
          T input_grad = 0;
#pragma omp simd reduction(+ : input_grad, log_decay_grad)
          for (int64_t n = 0; n < s.dstate; ++n) {
            const T adjoint = lam[o + n] + gy * C_t[n];  // lam_t
            grad_C_t[n] += gy * h_now[o + n];
            grad_B_t[n] += input * adjoint;
            input_grad += adjoint * B_t[n];
            const T decayed = adjoint * decay;
            log_decay_grad += decayed * h_prev[o + n];  // gradient of the log-decay step_t A
            lam[o + n] = decayed;
          }
          // input = step * x: its gradient flows to both; x also reaches y through the skip D x
          grad_x_t[p] = input_grad * dt + D_h[p] * gy;
          grad_D_h[p] += gy * x_t[p];
          input_grad_dot_x += input_grad * x_t[p];
        }
        grad_step[s.step_at(b, t, h)] = log_decay_grad * A[h] + input_grad_dot_x;
        grad_A[h] += log_decay_grad * dt;
      }
    }
  }
}

// A [batch, seqlen, blocks, size] tensor whose [blocks, size] block of each step is contiguous (batch and time
// strides are free): x, B and C, and the gradients written for them.
// (A stride along an axis of size 1 is never used, so it is not checked: torch calls such tensors contiguous.)
void check_steps(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4 && (t.size(3) == 1 || t.stride(3) == 1) && (t.size(2) == 1 || t.stride(2) == t.size(3)),
              "ssd_scan (C++): ", name, " must be [batch, seqlen, blocks, size] with each step's block contiguous");
}

// B and C share their batch and time strides (Shape keeps one pair), where those axes have more than one entry.
bool same_steps(const torch::Tensor& B, const torch::Tensor& C) {
  return (B.size(0) == 1 || B.stride(0) == C.stride(0)) && (B.size(1) == 1 || B.stride(1) == C.stride(1));
}

Shape check_all(const torch::Tensor& x, const torch::Tensor& step, const torch::Tensor& A, const torch::Tensor& B,
                const torch::Tensor& C, const torch::Tensor& D) {
  for (const auto* t : {&x, &step, &A, &B, &C, &D}) {
    TORCH_CHECK(t->device().is_cpu(), "ssd_scan (C++): CPU tensors only");
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "ssd_scan (C++): mixed dtypes");
  }
  for (const auto* t : {&step, &A, &D}) TORCH_CHECK(t->is_contiguous(), "ssd_scan (C++): step, A and D contiguous");
  check_steps(x, "x");
  check_steps(B, "B");
  check_steps(C, "C");
  const Shape s{x.size(0), x.size(1), x.size(2), x.size(3), B.size(2), B.size(3),
                x.stride(0), x.stride(1), B.stride(0), B.stride(1)};
  TORCH_CHECK(step.sizes() == std::vector<int64_t>({s.batch, s.seqlen, s.nheads}), "step must be [batch, seqlen, nheads]");
  TORCH_CHECK(A.dim() == 1 && A.size(0) == s.nheads, "A must be [nheads]");
  TORCH_CHECK(D.numel() == s.nheads * s.headdim, "D must hold nheads * headdim values (one per channel)");
  TORCH_CHECK(B.size(0) == s.batch && B.size(1) == s.seqlen && C.sizes() == B.sizes() && same_steps(B, C),
              "B and C must be [batch, seqlen, ngroups, dstate] with the same strides");
  TORCH_CHECK(s.ngroups > 0 && s.nheads % s.ngroups == 0, "ngroups must divide nheads");
  return s;
}

// y = scan(x, step, A, B, C) + D x, contiguous [batch, seqlen, nheads, headdim]; D holds one value per channel.
torch::Tensor forward(torch::Tensor x, torch::Tensor step, torch::Tensor A, torch::Tensor B, torch::Tensor C,
                      torch::Tensor D) {
  const Shape s = check_all(x, step, A, B, C, D);
  auto y = torch::empty(x.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ssd_scan_cpu_forward", [&] {
    at::parallel_for(0, s.batch, 1, [&](int64_t begin, int64_t end) {
      FlushSubnormals flushed;
      forward_rows<scalar_t>(s, x.data_ptr<scalar_t>(), step.data_ptr<scalar_t>(), A.data_ptr<scalar_t>(),
                             B.data_ptr<scalar_t>(), C.data_ptr<scalar_t>(), D.data_ptr<scalar_t>(),
                             y.data_ptr<scalar_t>(), begin, end);
    });
  });
  return y;
}

// Writes the gradients of x, B and C into grad_x, grad_B and grad_C (laid out as x, B and C: the column blocks of one
// tensor when x, B and C are); returns grad_step (with respect to the step given, after bias and softplus), grad_A
// and grad_D.
std::vector<torch::Tensor> backward(torch::Tensor grad_y, torch::Tensor x, torch::Tensor step, torch::Tensor A,
                                    torch::Tensor B, torch::Tensor C, torch::Tensor D, torch::Tensor grad_x,
                                    torch::Tensor grad_B, torch::Tensor grad_C) {
  const Shape s = check_all(x, step, A, B, C, D);
  TORCH_CHECK(grad_y.is_contiguous() && grad_y.sizes() == x.sizes() && grad_y.scalar_type() == x.scalar_type(),
              "grad_y must be contiguous and match x");
  TORCH_CHECK(grad_x.sizes() == x.sizes() && grad_x.strides() == x.strides() && grad_B.sizes() == B.sizes() &&
                  grad_B.strides() == B.strides() && grad_C.sizes() == C.sizes() && grad_C.strides() == C.strides(),
              "the gradients of x, B and C must be laid out as x, B and C");
  for (const auto* t : {&grad_x, &grad_B, &grad_C}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == x.scalar_type(), "gradients: CPU tensors of x's dtype");
  }
  auto grad_step = torch::empty_like(step);
  // One partial grad_A and grad_D per slice of rows, summed after: the slices run in parallel.
  const int64_t slices = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), s.batch));
  auto grad_A_parts = torch::zeros({slices, s.nheads}, A.options());
  auto grad_D_parts = torch::zeros({slices, s.nheads * s.headdim}, A.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ssd_scan_cpu_backward", [&] {
    at::parallel_for(0, slices, 1, [&](int64_t first, int64_t last) {
      FlushSubnormals flushed;
      for (int64_t slice = first; slice < last; ++slice) {
        backward_rows<scalar_t>(s, grad_y.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), step.data_ptr<scalar_t>(),
                                A.data_ptr<scalar_t>(), B.data_ptr<scalar_t>(), C.data_ptr<scalar_t>(),
                                D.data_ptr<scalar_t>(), grad_x.data_ptr<scalar_t>(), grad_step.data_ptr<scalar_t>(),
                                grad_A_parts.data_ptr<scalar_t>() + slice * s.nheads, grad_B.data_ptr<scalar_t>(),
                                grad_C.data_ptr<scalar_t>(), grad_D_parts.data_ptr<scalar_t>() + slice * s.nheads * s.headdim,
                                s.batch * slice / slices, s.batch * (slice + 1) / slices);
      }
    });
  });
  return {grad_step, grad_A_parts.sum(0), grad_D_parts.sum(0).view(D.sizes())};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "SSD scan y = scan(x, step, A, B, C) + D x (CPU)");
  m.def("backward", &backward, "gradients of the SSD scan (CPU)");
}
