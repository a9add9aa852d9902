"""``keep_freed_memory``: glibc's malloc keeps freed large blocks for reuse, so a step's large
temporaries stop page-faulting on every call (each command applies it in ``apply_threads``)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from distillspec.common.runtime import keep_freed_memory

# A sampled block's temporaries, every call: 8 rows x 5 positions of a 49k vocabulary warped to
# float32 probabilities (7.9 MB each). The control pins glibc's initial 128 KiB mmap threshold,
# so every such block is fresh pages from the OS. (Left alone, glibc raises the threshold after
# a large free and lowers it again after trims, so its default faults on some runs and not on
# others: 0 to 5728 faults per call here across runs of this snippet.)
STEPS = """
import ctypes, resource, sys, torch
from distillspec.common.runtime import M_MMAP_THRESHOLD, keep_freed_memory
from distillspec.decoding.params import SamplingConfig
from distillspec.decoding.sampling import warp_rows
if sys.argv[1] == "keep":
    assert keep_freed_memory()
else:
    assert ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 128 << 10)
logits = (torch.randn(8, 5, 49152) * 3).bfloat16()
samplings = [SamplingConfig(temperature=0.7)] * 8
with torch.inference_mode():
    for _ in range(3):
        warp_rows(logits, samplings)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        warp_rows(logits, samplings)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


def page_faults_per_call(mode: str) -> float:
    """Minor page faults per warp of the block, in a fresh process."""
    done = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True,
                          check=True, timeout=120)
    return float(done.stdout)


def test_kept_memory_stops_the_page_faults_of_a_step_s_large_temporaries():
    if not keep_freed_memory():
        pytest.skip("glibc only")
    fresh = page_faults_per_call("fresh pages")
    kept = page_faults_per_call("keep")
    assert fresh > 2000, "the control must page-fault (two 7.9 MB blocks: ~3900 pages)"
    assert kept < fresh / 5
