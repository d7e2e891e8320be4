"""Shared test setup.

One intra-op thread: on the two shared CPU cores, two OpenMP threads that lose a core to another
process spin at every barrier, and a small forward pass became 100x slower (7 s instead of 0.07 s).
Set BENCH_TEST_THREADS to use more.
"""
import os

import torch

torch.set_num_threads(int(os.environ.get("BENCH_TEST_THREADS", "1")))
