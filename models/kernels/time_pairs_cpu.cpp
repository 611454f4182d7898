// TiSASRec's per-pair time terms with the repository's pairwise dropout, on the CPU, without materialising the
// [batch, L, L, hidden] tensor of dropped embeddings.
//
// For sequence b, query row r at position i = rows[b, r], key j <= i, bucket k = relation[b, i, j], channel c of
// head h(c) = c / head_size, and the dropped embedding e(c) = table[k, c] * keep(b, i, j, c) / (1 - p):
//   scores[b, h, r, j]  = sum over c of head h of  query[b, r, c] * e_K(c)        (0 for j > i)
//   context[b, r, c]    = sum over j <= i of        probs[b, h(c), r, j] * e_V(c)
// keep() is recomputed from a counter-based generator instead of stored: SplitMix64 at counter
// (((stream * batch + b) * L + i) * L + j) * ceil(hidden / 2) + c / 2 gives 64 bits, 32 for each of two channels,
// dropped where they fall below p * 2^32. A (b, i, j, c) element gets the same draw wherever it is used (every
// layer, the full rows and the rows at `at`, forward and backward), which is the repository's semantics: the
// dropped tensors are drawn once per forward and shared by the layers.
//
// Backward: grad_query = sum_j g_scores e_K; grad_table_K[k] += g_scores query keep / (1 - p) over the pairs in
// bucket k; grad_probs = g_context . e_V per head; grad_table_V[k] += probs g_context keep / (1 - p). Each slice
// of batch rows sums its own table gradient (the tables are small: buckets x hidden).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_common.h"

namespace {

using harness::splitmix64;


// The keep factors (0 or 1 / (1 - p)) of one pair's hidden channels.
struct PairMask {
  uint64_t seed;
  int64_t stream, batch, length, hidden;
  uint32_t threshold;  // round(p * 2^32): a channel is dropped where its 32 bits fall below it
  float scale;         // 1 / (1 - p)

  int64_t words() const { return (hidden + 1) / 2; }

  // draws: words() and halves: 2 * words() values of scratch space. The draws run as one vector loop (AVX-512DQ
  // multiplies 64-bit lanes) and the comparisons as another: drawn and split word by word, as this did before, a
  // pair's mask took 10x as long (136 ns at hidden 64, most of TiSASRec's time-pair kernels).
  template <typename T>
  void fill(int64_t b, int64_t i, int64_t j, T* __restrict keep, uint64_t* __restrict draws,
            uint32_t* __restrict halves) const {
    const int64_t n_words = words();
    if (n_words == 0) return;  // no channels (memcpy must not see the empty buffers' null pointers)
    const uint64_t first = static_cast<uint64_t>((((stream * batch + b) * length + i) * length + j) * n_words);
#pragma omp simd
    for (int64_t w = 0; w < n_words; ++w) {
      draws[w] = splitmix64(seed + (first + static_cast<uint64_t>(w)) * 0x9E3779B97F4A7C15ULL);
    }
    // word w's low 32 bits are channel 2w's, its high 32 bits channel 2w + 1's: on a little-endian machine that is
    // the words' own memory order
    static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the mask's halves assume little-endian words");
    std::memcpy(halves, draws, static_cast<size_t>(n_words) * sizeof(uint64_t));
    const T kept = static_cast<T>(scale);
#pragma omp simd
    for (int64_t c = 0; c < hidden; ++c) keep[c] = halves[c] < threshold ? T(0) : kept;
  }
};

// Scratch space for PairMask::fill, one per thread.
struct MaskScratch {
  std::vector<uint64_t> draws;
  std::vector<uint32_t> halves;
  explicit MaskScratch(const PairMask& mask) : draws(mask.words()), halves(2 * mask.words()) {}
};

PairMask make_mask(int64_t seed, int64_t stream, int64_t batch, int64_t length, int64_t hidden, double p) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "dropout probability must be in [0, 1)");
  const double threshold = std::min(std::round(p * 4294967296.0), 4294967295.0);
  return PairMask{static_cast<uint64_t>(seed), stream, batch, length, hidden, static_cast<uint32_t>(threshold),
                  static_cast<float>(1.0 / (1.0 - p))};
}

struct Shapes {
  int64_t batch, rows, length, hidden, heads, head_size, buckets;
};

Shapes check(const torch::Tensor& per_row, const torch::Tensor& table, const torch::Tensor& relation,
             const torch::Tensor& rows, int64_t heads) {
  TORCH_CHECK(per_row.dim() == 3 && per_row.is_contiguous(),
              "query/grad_context must be contiguous [batch, rows, hidden]");
  TORCH_CHECK(table.dim() == 2 && table.is_contiguous() && table.size(1) == per_row.size(2) &&
                  table.scalar_type() == per_row.scalar_type(),
              "table must be a contiguous [buckets, hidden] tensor of the query's dtype");
  TORCH_CHECK(relation.dim() == 3 && relation.is_contiguous() && relation.scalar_type() == torch::kInt64 &&
                  relation.size(0) == per_row.size(0) && relation.size(1) == relation.size(2),
              "relation must be a contiguous int64 [batch, L, L] tensor");
  TORCH_CHECK(rows.dim() == 2 && rows.is_contiguous() && rows.scalar_type() == torch::kInt64 &&
                  rows.size(0) == per_row.size(0) && rows.size(1) == per_row.size(1),
              "rows must be a contiguous int64 [batch, rows] tensor");
  TORCH_CHECK(heads > 0 && per_row.size(2) % heads == 0, "hidden must be divisible by heads");
  return Shapes{per_row.size(0), per_row.size(1), relation.size(1), per_row.size(2),
                heads,           per_row.size(2) / heads, table.size(0)};
}

// Calls visit(b, r, i, j, bucket, keep) for every causal pair (key j <= query position i = rows[b, r]) of the
// batch rows [begin, end), with the pair's keep factors.
template <typename T, typename Visit>
void for_each_pair(const Shapes& s, const PairMask& mask, const int64_t* relation, const int64_t* rows,
                   int64_t begin, int64_t end, Visit visit) {
  std::vector<T> keep(s.hidden);
  MaskScratch scratch(mask);
  for (int64_t b = begin; b < end; ++b) {
    for (int64_t r = 0; r < s.rows; ++r) {
      const int64_t i = rows[b * s.rows + r];
      TORCH_CHECK(i >= 0 && i < s.length, "row position out of range");
      for (int64_t j = 0; j <= i; ++j) {
        const int64_t bucket = relation[(b * s.length + i) * s.length + j];
        TORCH_CHECK(bucket >= 0 && bucket < s.buckets, "time bucket out of range of the table");
        mask.fill(b, i, j, keep.data(), scratch.draws.data(), scratch.halves.data());
        visit(b, r, i, j, bucket, keep.data());
      }
    }
  }
}

// The backward passes' loop: visit(b, r, j, bucket, keep, grad_table_row) for every causal pair, the batch rows
// split into slices that run in parallel, each slice summing into its own table gradient (no data race); returns
// the table gradient [buckets, hidden].
template <typename T, typename Visit>
torch::Tensor sum_table_gradient(const Shapes& s, const PairMask& mask, const torch::Tensor& relation,
                                 const torch::Tensor& rows, const torch::Tensor& table, Visit visit) {
  const int64_t slices = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), s.batch));
  auto parts = torch::zeros({slices, s.buckets, s.hidden}, table.options());
  at::parallel_for(0, slices, 1, [&](int64_t first, int64_t last) {
    for (int64_t slice = first; slice < last; ++slice) {
      T* grad_table = parts.data_ptr<T>() + slice * s.buckets * s.hidden;
      for_each_pair<T>(s, mask, relation.data_ptr<int64_t>(), rows.data_ptr<int64_t>(), s.batch * slice / slices,
                       s.batch * (slice + 1) / slices,
                       [&](int64_t b, int64_t r, int64_t, int64_t j, int64_t k, const T* keep) {
                         visit(b, r, j, k, keep, grad_table + k * s.hidden);
                       });
    }
  });
  return parts.sum(0);
}

// scores [batch, heads, rows, L] = query . dropped table_K, per head.
torch::Tensor scores_forward(torch::Tensor query, torch::Tensor table, torch::Tensor relation, torch::Tensor rows,
                             int64_t heads, int64_t seed, int64_t stream, double p) {
  const Shapes s = check(query, table, relation, rows, heads);
  const PairMask mask = make_mask(seed, stream, s.batch, s.length, s.hidden, p);
  auto scores = torch::zeros({s.batch, s.heads, s.rows, s.length}, query.options());
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "time_pair_scores", [&] {
    const scalar_t* q = query.data_ptr<scalar_t>();
    const scalar_t* tab = table.data_ptr<scalar_t>();
    scalar_t* out = scores.data_ptr<scalar_t>();
    at::parallel_for(0, s.batch, 1, [&](int64_t begin, int64_t end) {
      for_each_pair<scalar_t>(s, mask, relation.data_ptr<int64_t>(), rows.data_ptr<int64_t>(), begin, end,
                              [&](int64_t b, int64_t r, int64_t, int64_t j, int64_t k, const scalar_t* keep) {
                                const scalar_t* __restrict q_r = q + (b * s.rows + r) * s.hidden;
                                const scalar_t* __restrict e = tab + k * s.hidden;
                                for (int64_t h = 0; h < s.heads; ++h) {
                                  scalar_t sum = 0;
                                  for (int64_t c = h * s.head_size; c < (h + 1) * s.head_size; ++c)
                                    sum += q_r[c] * e[c] * keep[c];
                                  out[((b * s.heads + h) * s.rows + r) * s.length + j] = sum;
                                }
                              });
    });
  });
  return scores;
}

// Returns grad_query [batch, rows, hidden] and grad_table [buckets, hidden].
std::vector<torch::Tensor> scores_backward(torch::Tensor grad_scores, torch::Tensor query, torch::Tensor table,
                                           torch::Tensor relation, torch::Tensor rows, int64_t heads, int64_t seed,
                                           int64_t stream, double p) {
  const Shapes s = check(query, table, relation, rows, heads);
  TORCH_CHECK(grad_scores.is_contiguous() &&
                  grad_scores.sizes() == torch::IntArrayRef({s.batch, s.heads, s.rows, s.length}),
              "grad_scores must be contiguous [batch, heads, rows, L]");
  const PairMask mask = make_mask(seed, stream, s.batch, s.length, s.hidden, p);
  auto grad_query = torch::zeros_like(query);
  torch::Tensor grad_table;
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "time_pair_scores_backward", [&] {
    const scalar_t* q = query.data_ptr<scalar_t>();
    const scalar_t* tab = table.data_ptr<scalar_t>();
    const scalar_t* g = grad_scores.data_ptr<scalar_t>();
    scalar_t* gq = grad_query.data_ptr<scalar_t>();
    grad_table = sum_table_gradient<scalar_t>(
        s, mask, relation, rows, table,
        [&](int64_t b, int64_t r, int64_t j, int64_t k, const scalar_t* keep, scalar_t* __restrict ge) {
          const scalar_t* __restrict q_r = q + (b * s.rows + r) * s.hidden;
          scalar_t* __restrict gq_r = gq + (b * s.rows + r) * s.hidden;
          const scalar_t* __restrict e = tab + k * s.hidden;
          for (int64_t h = 0; h < s.heads; ++h) {
            const scalar_t g_pair = g[((b * s.heads + h) * s.rows + r) * s.length + j];
            for (int64_t c = h * s.head_size; c < (h + 1) * s.head_size; ++c) {
              gq_r[c] += g_pair * e[c] * keep[c];
              ge[c] += g_pair * q_r[c] * keep[c];
            }
          }
        });
  });
  return {grad_query, grad_table};
}

// context [batch, rows, hidden] = sum_j probs[., h(c), ., j] * dropped table_V[., c].
torch::Tensor context_forward(torch::Tensor probs, torch::Tensor table, torch::Tensor relation, torch::Tensor rows,
                              int64_t seed, int64_t stream, double p) {
  TORCH_CHECK(probs.dim() == 4 && probs.is_contiguous(), "probs must be contiguous [batch, heads, rows, L]");
  const int64_t heads = probs.size(1);
  auto context = torch::zeros({probs.size(0), probs.size(2), table.size(1)}, probs.options());
  const Shapes s = check(context, table, relation, rows, heads);
  TORCH_CHECK(probs.size(3) == s.length, "probs must have L keys");
  const PairMask mask = make_mask(seed, stream, s.batch, s.length, s.hidden, p);
  AT_DISPATCH_FLOATING_TYPES(probs.scalar_type(), "time_pair_context", [&] {
    const scalar_t* pr = probs.data_ptr<scalar_t>();
    const scalar_t* tab = table.data_ptr<scalar_t>();
    scalar_t* out = context.data_ptr<scalar_t>();
    at::parallel_for(0, s.batch, 1, [&](int64_t begin, int64_t end) {
      for_each_pair<scalar_t>(s, mask, relation.data_ptr<int64_t>(), rows.data_ptr<int64_t>(), begin, end,
                              [&](int64_t b, int64_t r, int64_t, int64_t j, int64_t k, const scalar_t* keep) {
                                scalar_t* __restrict o = out + (b * s.rows + r) * s.hidden;
                                const scalar_t* __restrict e = tab + k * s.hidden;
                                for (int64_t h = 0; h < s.heads; ++h) {
                                  const scalar_t weight = pr[((b * s.heads + h) * s.rows + r) * s.length + j];
                                  for (int64_t c = h * s.head_size; c < (h + 1) * s.head_size; ++c)
                                    o[c] += weight * e[c] * keep[c];
                                }
                              });
    });
  });
  return context;
}

// Returns grad_probs [batch, heads, rows, L] (0 for j > i) and grad_table [buckets, hidden].
std::vector<torch::Tensor> context_backward(torch::Tensor grad_context, torch::Tensor probs, torch::Tensor table,
                                            torch::Tensor relation, torch::Tensor rows, int64_t seed, int64_t stream,
                                            double p) {
  TORCH_CHECK(probs.dim() == 4 && probs.is_contiguous(), "probs must be contiguous [batch, heads, rows, L]");
  const Shapes s = check(grad_context, table, relation, rows, probs.size(1));
  const PairMask mask = make_mask(seed, stream, s.batch, s.length, s.hidden, p);
  auto grad_probs = torch::zeros_like(probs);
  torch::Tensor grad_table;
  AT_DISPATCH_FLOATING_TYPES(probs.scalar_type(), "time_pair_context_backward", [&] {
    const scalar_t* pr = probs.data_ptr<scalar_t>();
    const scalar_t* tab = table.data_ptr<scalar_t>();
    const scalar_t* g = grad_context.data_ptr<scalar_t>();
    scalar_t* gp = grad_probs.data_ptr<scalar_t>();
    grad_table = sum_table_gradient<scalar_t>(
        s, mask, relation, rows, table,
        [&](int64_t b, int64_t r, int64_t j, int64_t k, const scalar_t* keep, scalar_t* __restrict ge) {
          const scalar_t* __restrict g_r = g + (b * s.rows + r) * s.hidden;
          const scalar_t* __restrict e = tab + k * s.hidden;
          for (int64_t h = 0; h < s.heads; ++h) {
            const int64_t at_pair = ((b * s.heads + h) * s.rows + r) * s.length + j;
            const scalar_t weight = pr[at_pair];
            scalar_t sum = 0;
            for (int64_t c = h * s.head_size; c < (h + 1) * s.head_size; ++c) {
              sum += g_r[c] * e[c] * keep[c];
              ge[c] += weight * g_r[c] * keep[c];
            }
            gp[at_pair] = sum;
          }
        });
  });
  return {grad_probs, grad_table};
}

// The keep factors of every pair, [batch, L, L, hidden] (j > i included): for tests, which rebuild the dropped
// tensors in torch from them.
torch::Tensor keep_factors(int64_t seed, int64_t stream, int64_t batch, int64_t length, int64_t hidden, double p) {
  const PairMask mask = make_mask(seed, stream, batch, length, hidden, p);
  auto keep = torch::empty({batch, length, length, hidden}, torch::kFloat32);
  float* out = keep.data_ptr<float>();
  MaskScratch scratch(mask);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t i = 0; i < length; ++i)
      for (int64_t j = 0; j < length; ++j) {
        mask.fill(b, i, j, out + ((b * length + i) * length + j) * hidden, scratch.draws.data(),
                  scratch.halves.data());
      }
  return keep;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("scores_forward", &scores_forward, "per-head query . dropped time-key embedding, causal pairs (CPU)");
  m.def("scores_backward", &scores_backward, "gradients of scores_forward (CPU)");
  m.def("context_forward", &context_forward, "attention-weighted dropped time-value embeddings (CPU)");
  m.def("context_backward", &context_backward, "gradients of context_forward (CPU)");
  m.def("keep_factors", &keep_factors, "the dropout keep factors of every pair (tests)");
}
