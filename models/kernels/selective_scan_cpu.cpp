// Mamba1 selective scan on the CPU, a block of channels of one batch row at a time, with everything around the
// recurrence fused in: the step sizes' bias and softplus, the skip connection D*u and the SiLU gate z.
//
// The torch twin (selective_scan.py) runs the recurrence as whole-tensor steps, so every step streams a
// batch*dim*dstate state through memory a dozen times; here the states live in the L1/L2 cache and the inner
// loops are vectorised, exp included (glibc's libmvec, enabled by -ffast-math). The forward pass runs a block of
// kBlock neighbouring channels at once, one vector lane per channel ([dstate][kBlock] states): C_t . h_t then
// sums lane by lane, with no reduction across lanes per step (1.2-1.35x the forward pass that ran one channel at
// a time along the state axis, at [2048, 50] and dim 32 and 128). The backward pass still runs one channel at a
// time, vectorised along the state axis with its recomputed history (seqlen*dstate values): written in lanes it
// was no faster at dim 128 and 1.2x slower at dim 32 (its loop is bound by loads and stores, and the gradients of
// B and C would sum across lanes).
// The parts outside the recurrence are per-element work that torch would run as a dozen more passes over the
// [batch, dim, seqlen] tensors (and as many again backwards, with transposing copies); here they run on a block
// of kBlock neighbouring channels at a time, vectorised over the block (one cache line of each time step of the
// callers' channel-last storage), into small per-block buffers that the block's scans then read from L1. Lanes
// past the last channel (dim not a multiple of kBlock) carry zeros, so their states stay 0 (for finite B) and
// nothing reads them.
//
// Every sequence tensor is time-major, [batch, seqlen, channels] with unit stride along the channels and any
// other strides (Mamba's are views of its projections' outputs, read in place): u, delta, z and y with dim
// channels, B and C with dstate. A is [dim, dstate]; D and delta_bias are [dim]; D, z and delta_bias may be
// absent.
//   step_t = softplus(delta_t + bias) (or without either),  h_t = exp(step_t A) h_{t-1} + step_t u_t B_t,
//   y_t = (C_t . h_t + D u_t) * silu(z_t)
// The backward pass recomputes a sequence's step sizes and states from zero (no checkpoints are kept) and runs
// the adjoint lam_t = g_t C_t + exp(step_{t+1} A) lam_{t+1} backwards in time, both up to the row's last step with
// an output gradient (harness::steps_reached: under prefix training, the row's last item, not the batch's longest
// row).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <type_traits>
#include <vector>

#include "cpu_common.h"

namespace {

using harness::FlushSubnormals;
using harness::sigmoid;

// channels per block: the forward recurrence's vector lanes and the unit of the per-element work around both
// passes' recurrences (one 64-byte line of float32)
constexpr int64_t kBlock = 16;

// A time-major [batch, seqlen, channels] tensor with unit stride along the channels: step t of row b starts at
// data[b * sb + t * st]. data is null for an absent tensor.
template <typename P>
struct TimeMajor {
  P* data = nullptr;
  int64_t sb = 0, st = 0;
  P* at(int64_t b, int64_t t) const { return data + b * sb + t * st; }
};

template <typename T>
TimeMajor<const T> read(const std::optional<torch::Tensor>& t) {
  if (!t || !t->defined()) return {};
  return {t->data_ptr<T>(), t->stride(0), t->stride(1)};
}

template <typename T>
TimeMajor<T> write(torch::Tensor& t) {
  if (!t.defined()) return {};
  return {t.data_ptr<T>(), t.stride(0), t.stride(1)};
}

// What surrounds the recurrence, shared by both passes. D and bias point to zeros when absent, so that the
// per-channel loops below have no branch inside.
template <typename T>
struct Around {
  const T* D;            // [dim]
  TimeMajor<const T> z;  // data null without a gate
  const T* bias;         // [dim]
  bool softplus;         // torch's: threshold 20, above it the identity
};

// The inputs of the recurrence for channels [d0, d0 + width) of row b, [seqlen][kBlock]: the step sizes and
// x = step * u, vectorised over the block, the transcendental functions included.
template <typename T>
void block_inputs(TimeMajor<const T> u, TimeMajor<const T> delta, const Around<T>& around, int64_t b, int64_t d0,
                  int64_t width, int64_t seqlen, T* __restrict steps, T* __restrict xs) {
  const T* __restrict bias = around.bias + d0;
  for (int64_t t = 0; t < seqlen; ++t) {
    const T* __restrict delta_t = delta.at(b, t) + d0;
    const T* __restrict u_t = u.at(b, t) + d0;
    T* __restrict steps_t = steps + t * kBlock;
    T* __restrict xs_t = xs + t * kBlock;
    if (around.softplus) {
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) {
        const T pre = delta_t[j] + bias[j];
        steps_t[j] = pre <= T(20) ? std::log1p(std::exp(std::min(pre, T(20)))) : pre;  // no exp overflows
        xs_t[j] = steps_t[j] * u_t[j];
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) {
        steps_t[j] = delta_t[j] + bias[j];
        xs_t[j] = steps_t[j] * u_t[j];
      }
    }
    for (int64_t j = width; j < kBlock; ++j) steps_t[j] = xs_t[j] = T(0);
  }
}

// A for channels [d0, d0 + width), [dstate][kBlock]: one vector across the block per state index, 0 past width.
template <typename T>
void block_A(const T* A, int64_t d0, int64_t width, int64_t dstate, T* __restrict A_block) {
  for (int64_t n = 0; n < dstate; ++n) {
    for (int64_t j = 0; j < kBlock; ++j) A_block[n * kBlock + j] = j < width ? A[(d0 + j) * dstate + n] : T(0);
  }
}

// Batch rows [begin, end) of the forward scan.
template <typename T>
void forward_rows(TimeMajor<const T> u, TimeMajor<const T> delta, const T* A, TimeMajor<const T> B,
                  TimeMajor<const T> C, const Around<T>& around, TimeMajor<T> y, int64_t begin, int64_t end,
                  int64_t dim, int64_t seqlen, int64_t dstate) {
  // per block: the states and A, [dstate][kBlock]; step sizes, x = step * u and C_t . h_t, [seqlen][kBlock]
  std::vector<T> state_buffer(dstate * kBlock), A_buffer(dstate * kBlock), steps_buffer(seqlen * kBlock),
      x_buffer(seqlen * kBlock), scanned_buffer(seqlen * kBlock);
  T* __restrict h = state_buffer.data();
  T* __restrict A_block = A_buffer.data();
  T* __restrict steps = steps_buffer.data();
  T* __restrict xs = x_buffer.data();
  T* __restrict scanned = scanned_buffer.data();
  for (int64_t b = begin; b < end; ++b) {
    for (int64_t d0 = 0; d0 < dim; d0 += kBlock) {
      const int64_t width = std::min(kBlock, dim - d0);
      block_inputs(u, delta, around, b, d0, width, seqlen, steps, xs);
      block_A(A, d0, width, dstate, A_block);
      std::fill(h, h + dstate * kBlock, T(0));
      for (int64_t t = 0; t < seqlen; ++t) {
        const T* __restrict step = steps + t * kBlock;
        const T* __restrict x = xs + t * kBlock;
        const T* __restrict B_t = B.at(b, t);
        const T* __restrict C_t = C.at(b, t);
        alignas(64) T out[kBlock] = {};  // C_t . h_t, lane by lane: no reduction across lanes
        for (int64_t n = 0; n < dstate; ++n) {
          const T b_n = B_t[n], c_n = C_t[n];
          const T* __restrict A_n = A_block + n * kBlock;
          T* __restrict h_n = h + n * kBlock;
#pragma omp simd
          for (int64_t j = 0; j < kBlock; ++j) {
            h_n[j] = std::exp(step[j] * A_n[j]) * h_n[j] + x[j] * b_n;
            out[j] += h_n[j] * c_n;
          }
        }
        for (int64_t j = 0; j < kBlock; ++j) scanned[t * kBlock + j] = out[j];
      }
      // the skip connection and the gate
      const T* __restrict skip = around.D + d0;
      for (int64_t t = 0; t < seqlen; ++t) {
        const T* __restrict u_t = u.at(b, t) + d0;
        const T* __restrict scanned_t = scanned + t * kBlock;
        T* __restrict y_t = y.at(b, t) + d0;
        if (around.z.data) {
          const T* __restrict z_t = around.z.at(b, t) + d0;
#pragma omp simd
          for (int64_t j = 0; j < width; ++j) y_t[j] = (scanned_t[j] + skip[j] * u_t[j]) * z_t[j] * sigmoid(z_t[j]);
        } else {
#pragma omp simd
          for (int64_t j = 0; j < width; ++j) y_t[j] = scanned_t[j] + skip[j] * u_t[j];
        }
      }
    }
  }
}

// The gradients one backward call fills: the per-element ones (z's only with a gate) and this slice's partial
// sums over its rows of the per-channel ones.
template <typename T>
struct Grads {
  TimeMajor<T> u, delta, z;  // [batch, seqlen, dim]
  T* B;                      // [batch, seqlen, dstate] contiguous, rows owned by the slice
  T* C;
  T* A;     // [dim, dstate] partial
  T* D;     // [dim] partial
  T* bias;  // [dim] partial
};

// Batch rows [begin, end) of the backward scan.
template <typename T>
void backward_rows(TimeMajor<const T> grad_y, TimeMajor<const T> u, TimeMajor<const T> delta, const T* A,
                   TimeMajor<const T> B, TimeMajor<const T> C, const Around<T>& around, const Grads<T>& grad,
                   int64_t begin, int64_t end, int64_t dim, int64_t seqlen, int64_t dstate) {
  // per sequence: states[t + 1] = h_t (states[0] = h_{-1} = 0), decays[t] = exp(step_t A), the adjoint; per block
  // [seqlen][kBlock]: step sizes, x = step * u, the gradient reaching the scan's output (after the gate),
  // C_t . h_t (for the gate's gradient), and the scan's gradients with respect to x and to the step
  std::vector<T> states_buffer((seqlen + 1) * dstate), decays_buffer(seqlen * dstate), adjoint_buffer(dstate);
  std::vector<T> steps_buffer(seqlen * kBlock), x_buffer(seqlen * kBlock), gy_buffer(seqlen * kBlock),
      scanned_buffer(seqlen * kBlock), gx_buffer(seqlen * kBlock), gs_buffer(seqlen * kBlock);
  T* __restrict states = states_buffer.data();
  T* __restrict decays = decays_buffer.data();
  T* __restrict lam = adjoint_buffer.data();
  T* __restrict steps = steps_buffer.data();
  T* __restrict xs = x_buffer.data();
  T* __restrict gy = gy_buffer.data();
  T* __restrict scanned = scanned_buffer.data();
  T* __restrict gx = gx_buffer.data();
  T* __restrict gs = gs_buffer.data();
  const bool gated = around.z.data != nullptr;
  for (int64_t b = begin; b < end; ++b) {
    T* grad_B_row = grad.B + b * seqlen * dstate;
    T* grad_C_row = grad.C + b * seqlen * dstate;
    // steps past the row's last output gradient produce zeros: neither recomputed nor run backwards
    const int64_t reached = harness::steps_reached(grad_y.at(b, 0), grad_y.st, dim, seqlen);
    for (int64_t t = reached; t < seqlen; ++t) {
      std::fill(grad.u.at(b, t), grad.u.at(b, t) + dim, T(0));
      std::fill(grad.delta.at(b, t), grad.delta.at(b, t) + dim, T(0));
      if (gated) std::fill(grad.z.at(b, t), grad.z.at(b, t) + dim, T(0));
    }
    for (int64_t d0 = 0; d0 < dim && reached > 0; d0 += kBlock) {
      const int64_t width = std::min(kBlock, dim - d0);
      block_inputs(u, delta, around, b, d0, width, reached, steps, xs);
      for (int64_t t = 0; t < reached; ++t) {
        const T* __restrict grad_y_t = grad_y.at(b, t) + d0;
        T* __restrict gy_t = gy + t * kBlock;
        if (gated) {
          const T* __restrict z_t = around.z.at(b, t) + d0;
#pragma omp simd
          for (int64_t j = 0; j < width; ++j) gy_t[j] = grad_y_t[j] * z_t[j] * sigmoid(z_t[j]);
        } else {
#pragma omp simd
          for (int64_t j = 0; j < width; ++j) gy_t[j] = grad_y_t[j];
        }
      }
      for (int64_t j = 0; j < width; ++j) {
        const T* __restrict A_d = A + (d0 + j) * dstate;
        T* __restrict grad_A_d = grad.A + (d0 + j) * dstate;
        for (int64_t n = 0; n < dstate; ++n) states[n] = 0;
        for (int64_t t = 0; t < reached; ++t) {
          const T step = steps[t * kBlock + j];
          const T x = xs[t * kBlock + j];
          const T* __restrict B_t = B.at(b, t);
          const T* __restrict prev = states + t * dstate;
          T* __restrict next = states + (t + 1) * dstate;
          T* __restrict decay = decays + t * dstate;
          if (gated) {  // C_t . h_t too, which the gate's gradient needs
            const T* __restrict C_t = C.at(b, t);
            T out = 0;
#pragma omp simd reduction(+ : out)
            for (int64_t n = 0; n < dstate; ++n) {
              decay[n] = std::exp(step * A_d[n]);
              next[n] = decay[n] * prev[n] + x * B_t[n];
              out += next[n] * C_t[n];
            }
            scanned[t * kBlock + j] = out;
          } else {
#pragma omp simd
            for (int64_t n = 0; n < dstate; ++n) {
              decay[n] = std::exp(step * A_d[n]);
              next[n] = decay[n] * prev[n] + x * B_t[n];
            }
          }
        }
        for (int64_t n = 0; n < dstate; ++n) lam[n] = 0;  // carries exp(step_{t+1} A) lam_{t+1}
        for (int64_t t = reached - 1; t >= 0; --t) {
          const T g = gy[t * kBlock + j];
          const T step = steps[t * kBlock + j];
          const T x = xs[t * kBlock + j];
          const T* __restrict B_t = B.at(b, t);
          const T* __restrict C_t = C.at(b, t);
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
            const T v = decayed * h_prev[n];  // gradient of the log-decay step_t A
            grad_step += v * A_d[n];
            grad_A_d[n] += step * v;
            lam[n] = decayed;
          }
          gx[t * kBlock + j] = grad_x;
          gs[t * kBlock + j] = grad_step;
        }
      }
      // x = step * u: its gradient flows to both, u's also through the skip; then back through the softplus
      // (its slope is the sigmoid of the pre-activation; torch's is 1 past the threshold) and the bias; and into
      // the gate: y = pre * silu(z), pre = C . h + D u
      const T* __restrict skip = around.D + d0;
      const T* __restrict bias = around.bias + d0;
      T* __restrict grad_skip = grad.D + d0;
      T* __restrict grad_bias = grad.bias + d0;
      const bool softplus = around.softplus;
      for (int64_t t = 0; t < reached; ++t) {
        const T* __restrict u_t = u.at(b, t) + d0;
        const T* __restrict delta_t = delta.at(b, t) + d0;
        const T* __restrict steps_t = steps + t * kBlock;
        const T* __restrict gy_t = gy + t * kBlock;
        const T* __restrict gx_t = gx + t * kBlock;
        const T* __restrict gs_t = gs + t * kBlock;
        T* __restrict grad_u_t = grad.u.at(b, t) + d0;
        T* __restrict grad_delta_t = grad.delta.at(b, t) + d0;
#pragma omp simd
        for (int64_t j = 0; j < width; ++j) {
          grad_u_t[j] = gx_t[j] * steps_t[j] + gy_t[j] * skip[j];
          const T pre = delta_t[j] + bias[j];
          const T slope = !softplus || pre > T(20) ? T(1) : sigmoid(pre);
          const T grad_pre = (gs_t[j] + gx_t[j] * u_t[j]) * slope;
          grad_delta_t[j] = grad_pre;
          grad_bias[j] += grad_pre;
          grad_skip[j] += gy_t[j] * u_t[j];
        }
        if (gated) {
          const T* __restrict grad_y_t = grad_y.at(b, t) + d0;
          const T* __restrict z_t = around.z.at(b, t) + d0;
          const T* __restrict scanned_t = scanned + t * kBlock;
          T* __restrict grad_z_t = grad.z.at(b, t) + d0;
#pragma omp simd
          for (int64_t j = 0; j < width; ++j) {
            const T sig = sigmoid(z_t[j]);
            const T pre = scanned_t[j] + skip[j] * u_t[j];
            grad_z_t[j] = grad_y_t[j] * pre * sig * (T(1) + z_t[j] * (T(1) - sig));
          }
        }
      }
    }
  }
}

void check_time_major(const torch::Tensor& t, const char* name, const torch::Tensor& like, int64_t channels) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 3 && t.size(0) == like.size(0) && t.size(1) == like.size(1) &&
                  t.size(2) == channels,
              name, " must be a CPU [batch, seqlen, ", channels, "] tensor");
  TORCH_CHECK(t.stride(2) == 1 || t.size(2) == 1 || t.numel() == 0, name, " must have unit stride along its channels");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "mixed dtypes: ", name);
}

void check_channel_vector(const std::optional<torch::Tensor>& t, const char* name, const torch::Tensor& u) {
  if (!t || !t->defined()) return;
  TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() && t->dim() == 1 && t->size(0) == u.size(2), name,
              " must be a contiguous CPU [dim] tensor");
  TORCH_CHECK(t->scalar_type() == u.scalar_type(), "mixed dtypes: ", name);
}

void check_all(const torch::Tensor& u, const torch::Tensor& delta, const torch::Tensor& A, const torch::Tensor& B,
               const torch::Tensor& C, const std::optional<torch::Tensor>& D, const std::optional<torch::Tensor>& z,
               const std::optional<torch::Tensor>& bias) {
  TORCH_CHECK(A.device().is_cpu() && A.is_contiguous() && A.dim() == 2, "A must be a contiguous CPU [dim, dstate] tensor");
  TORCH_CHECK(A.scalar_type() == u.scalar_type(), "mixed dtypes: A");
  const int64_t dim = A.size(0), dstate = A.size(1);
  check_time_major(u, "u", u, dim);
  check_time_major(delta, "delta", u, dim);
  if (z && z->defined()) check_time_major(*z, "z", u, dim);
  check_time_major(B, "B", u, dstate);
  check_time_major(C, "C", u, dstate);
  check_channel_vector(D, "D", u);
  check_channel_vector(bias, "delta_bias", u);
}

template <typename T>
Around<T> around_of(const std::optional<torch::Tensor>& D, const std::optional<torch::Tensor>& z,
                    const std::optional<torch::Tensor>& bias, bool softplus, const torch::Tensor& zeros) {
  const auto given = [&](const std::optional<torch::Tensor>& t) {
    return t && t->defined() ? t->data_ptr<T>() : zeros.data_ptr<T>();
  };
  return {given(D), read<T>(z), given(bias), softplus};
}

torch::Tensor forward(torch::Tensor u, torch::Tensor delta, torch::Tensor A, torch::Tensor B, torch::Tensor C,
                      std::optional<torch::Tensor> D, std::optional<torch::Tensor> z,
                      std::optional<torch::Tensor> delta_bias, bool softplus) {
  check_all(u, delta, A, B, C, D, z, delta_bias);
  const int64_t batch = u.size(0), seqlen = u.size(1), dim = A.size(0), dstate = A.size(1);
  auto y = torch::empty({batch, seqlen, dim}, u.options());
  const auto zeros = torch::zeros({dim}, u.options());  // D and the bias where absent
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_cpu_forward", [&] {
    using T = scalar_t;
    const auto around = around_of<T>(D, z, delta_bias, softplus, zeros);
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      FlushSubnormals flushed;
      forward_rows<T>(read<T>(u), read<T>(delta), A.data_ptr<T>(), read<T>(B), read<T>(C), around, write<T>(y),
                      begin, end, dim, seqlen, dstate);
    });
  });
  return y;
}

// Returns grad_u, grad_delta (with respect to delta before the bias), grad_A, grad_B, grad_C, grad_D, grad_z and
// grad_delta_bias, the sequence gradients time-major and contiguous; the last three undefined where D, z or the
// bias are absent.
std::vector<torch::Tensor> backward(torch::Tensor grad_y, torch::Tensor u, torch::Tensor delta, torch::Tensor A,
                                    torch::Tensor B, torch::Tensor C, std::optional<torch::Tensor> D,
                                    std::optional<torch::Tensor> z, std::optional<torch::Tensor> delta_bias,
                                    bool softplus) {
  check_all(u, delta, A, B, C, D, z, delta_bias);
  const int64_t batch = u.size(0), seqlen = u.size(1), dim = A.size(0), dstate = A.size(1);
  check_time_major(grad_y, "grad_y", u, dim);
  const bool has_D = D && D->defined(), has_z = z && z->defined(), has_bias = delta_bias && delta_bias->defined();
  const auto sequence = [&] { return torch::empty({batch, seqlen, dim}, u.options()); };
  auto grad_u = sequence();
  auto grad_delta = sequence();
  auto grad_z = has_z ? sequence() : torch::Tensor();
  auto grad_B = torch::zeros({batch, seqlen, dstate}, B.options());
  auto grad_C = torch::zeros({batch, seqlen, dstate}, C.options());
  // One partial sum of each per-channel gradient per slice of rows, summed after: the slices run in parallel.
  const int64_t slices = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), batch));
  auto grad_A_parts = torch::zeros({slices, dim, dstate}, A.options());
  auto grad_D_parts = torch::zeros({slices, dim}, A.options());
  auto grad_bias_parts = torch::zeros({slices, dim}, A.options());
  const auto zeros = torch::zeros({dim}, u.options());  // D and the bias where absent
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_cpu_backward", [&] {
    using T = scalar_t;
    const auto around = around_of<T>(D, z, delta_bias, softplus, zeros);
    at::parallel_for(0, slices, 1, [&](int64_t first, int64_t last) {
      FlushSubnormals flushed;
      for (int64_t slice = first; slice < last; ++slice) {
        const Grads<T> grads{write<T>(grad_u),
                             write<T>(grad_delta),
                             write<T>(grad_z),
                             grad_B.data_ptr<T>(),
                             grad_C.data_ptr<T>(),
                             grad_A_parts.data_ptr<T>() + slice * dim * dstate,
                             grad_D_parts.data_ptr<T>() + slice * dim,
                             grad_bias_parts.data_ptr<T>() + slice * dim};
        backward_rows<T>(read<T>(grad_y), read<T>(u), read<T>(delta), A.data_ptr<T>(), read<T>(B), read<T>(C),
                         around, grads, batch * slice / slices, batch * (slice + 1) / slices, dim, seqlen, dstate);
      }
    });
  });
  return {grad_u,
          grad_delta,
          grad_A_parts.sum(0),
          grad_B,
          grad_C,
          has_D ? grad_D_parts.sum(0) : torch::Tensor(),
          grad_z,
          has_bias ? grad_bias_parts.sum(0) : torch::Tensor()};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "selective scan y = (scan(u, softplus(delta + bias), A, B, C) + D u) silu(z) (CPU)");
  m.def("backward", &backward, "gradients of the selective scan (CPU)");
}
