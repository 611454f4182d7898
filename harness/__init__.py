"""Benchmark and AutoML harness for sequential recommenders."""

import os

# OpenMP threads that spin-wait stall badly when the CPU is shared (a study's workers, a laptop
# doing other work): measured 77 s vs 2.8 s for one selective scan at load 9. Passive waiting
# costs nothing on an idle machine. Only effective before torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
