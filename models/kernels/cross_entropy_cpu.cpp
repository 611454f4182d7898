// The row-wise part of the fused full-softmax cross-entropy (cross_entropy.py) on the CPU: for a block of score
// rows, in place, scores -> softmax - one_hot(target) (the loss's gradient with respect to the scores), and
// each row's loss logsumexp(scores) - scores[target].
//
// torch's ops take seven passes over a block (gather, amax, sub, exp, sum, div, scatter); here a row is read
// for its max, then exponentiated and summed in one pass, then scaled in a third, while it is in L1/L2. Values
// that would be subnormal are flushed to zero: the block feeds two matrix products next, and subnormal
// operands cost ~100 cycles a multiply on x86 (probabilities below 1e-38 change no gradient the model can see).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cpu_common.h"

namespace {

using harness::FlushSubnormals;

template <typename T>
T softmax_grad_row(T* __restrict row, int64_t classes, int64_t target) {
  // A max under -ffast-math may skip a NaN, but the NaN still reaches the exp and the sum: the loss is NaN.
  T top = row[0];
  for (int64_t c = 1; c < classes; ++c) top = row[c] > top ? row[c] : top;
  const T picked = row[target];
  T total = T(0);
#pragma omp simd reduction(+ : total)
  for (int64_t c = 0; c < classes; ++c) {
    row[c] = std::exp(row[c] - top);
    total += row[c];
  }
  const T scale = T(1) / total;
#pragma omp simd
  for (int64_t c = 0; c < classes; ++c) row[c] *= scale;
  row[target] -= T(1);
  return std::log(total) + top - picked;
}

// scores [rows, classes] contiguous, overwritten with d loss / d scores; returns the rows' losses.
torch::Tensor softmax_grad(torch::Tensor scores, const torch::Tensor& targets) {
  TORCH_CHECK(scores.device().is_cpu() && scores.dim() == 2 && scores.is_contiguous() && scores.size(1) > 0,
              "scores must be a contiguous CPU [rows, classes] tensor with at least one class");
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == scores.size(0) && targets.scalar_type() == torch::kInt64,
              "targets must be int64 [rows]");
  const int64_t rows = scores.size(0), classes = scores.size(1);
  const auto wanted = targets.contiguous();
  const int64_t* target = wanted.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(target[r] >= 0 && target[r] < classes, "target ", target[r], " out of range for ", classes, " classes");
  }
  auto losses = torch::empty({rows}, scores.options());
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "cross_entropy_softmax_grad", [&] {
    scalar_t* data = scores.data_ptr<scalar_t>();
    scalar_t* loss = losses.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      FlushSubnormals flushed;
      for (int64_t r = begin; r < end; ++r) loss[r] = softmax_grad_row(data + r * classes, classes, target[r]);
    });
  });
  return losses;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("softmax_grad", &softmax_grad, "scores -> softmax - one_hot(target) in place; returns the rows' losses");
}
