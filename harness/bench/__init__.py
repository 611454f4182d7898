"""End-to-end model benchmarks: training throughput, full-ranking inference, peak memory.

One cell = one (model, hidden size, sequence length, batch size, chunk size, kernel backend, training
protocol). For every cell on the chosen axes (`cells`), `run_benchmark` measures:

- training: one optimiser step (forward, full-softmax cross-entropy over every item with the tied item
  table, backward, Adam step) on a batch of `batch_size` sequences of `seq_len` items. Reported as
  sequences/s (batch / step time), positions/s (supervised (history, next item) pairs per second: one per
  sequence with the `prefix` protocol, one per real position with `all_positions`) and tokens/s (input
  positions processed per second);
- inference: full ranking of `infer_batch_size` users: encode, score every item, mask the padding id, rank
  the target (`harness.evaluate.batch_ranks`, what evaluation runs per batch). Reported as users/s and latency per batch (ms);
- peak memory of one training step and of one inference batch.

Timing rules (docs/design.md#measurement): every cell is built and runs `warmup` untimed steps first (they
also absorb allocator growth, lazy initialisation and Triton autotuning); then `repeats` rounds, each timing
one training step and one inference batch of every cell in turn, so that a machine whose speed drifts during
the run (a shared or throttled CPU) moves all cells alike and the ratios of one run stay fair;
`torch.cuda.synchronize()` before every clock read on CUDA. The median is the figure, the spread is
reported as the interquartile range and the min/max. Memory is measured in a separate, untimed step:

- CUDA: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`, less what was allocated before
  the step (the other cells' tensors are live too), plus the cell's own weights, gradients and optimiser
  state (memory_source "cuda.max_memory_allocated-live+state");
- CPU: the torch profiler's allocation trace (`profile_memory=True`): the highest running sum of tensor
  allocations minus frees during the step, plus the bytes of the parameters, gradients and optimiser state
  that were live before it (memory_source "torch.profiler.cpu-allocations+state"). It counts tensors only
  (not the Python heap or allocator caches), the closest CPU analogue of the CUDA figure.

Data: synthetic by default (uniform random item ids in 1..n_items, every sequence full length, increasing
timestamps with exponential gaps) or, with `dataset`, batches drawn from the dataset's own training and test
windows (lengths vary, so the cost reflects the real padding).

Measurement: `cells` (the axes and their product), `data` (the batches), `timing` (clocks and memory),
`machine` (what ran it) and `measure` (one cell, then every cell). Presentation: `present` shows the rows (plain
dicts with the axes, `AXES`, and `BENCH_METRICS`) as a terminal table (`render_table`) and logs them to MLflow
(`log_rows`: experiment "bench", run kind bench, one run per cell), from where the report reads them back.
"""
