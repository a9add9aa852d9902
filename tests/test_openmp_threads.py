"""``release_openmp_threads``: the calling thread's OpenMP team is freed, and torch works on in
every thread afterwards (the speed it buys is measured in docs/results/openmp-threads)."""

from __future__ import annotations

import sys
import threading

import pytest
import torch

from distillspec.common.runtime import _loaded_openmp_libraries, release_openmp_threads

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/maps")


def parallel_work() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 576, generator=generator)
    w = torch.randn(1536, 576, generator=generator)
    return torch.nn.functional.linear(x, w).sum(dim=0)


@linux
def test_finds_torchs_openmp_runtime_and_frees_the_callers_team():
    parallel_work()  # this thread now has a team (when torch runs more than one thread)
    libraries = _loaded_openmp_libraries()
    if not libraries:
        pytest.skip("this torch build loaded no OpenMP runtime")
    assert all("libgomp" in path for path in libraries)
    assert release_openmp_threads() is True


def test_torch_computes_the_same_in_every_thread_after_a_release():
    expected = parallel_work()
    release_openmp_threads()
    results = []
    thread = threading.Thread(target=lambda: results.append(parallel_work()))
    thread.start()
    thread.join()
    assert torch.equal(results[0], expected)
    assert torch.equal(parallel_work(), expected)  # the caller starts a new team
    release_openmp_threads()  # twice in a row: nothing left to free, no error


def test_a_release_while_another_thread_computes_leaves_its_results_exact():
    """GNU OpenMP frees the caller's team only: an engine thread computing meanwhile goes on,
    unharmed (a runtime whose hard pause stopped every team would break or hang this)."""
    expected = parallel_work()
    results: list[bool] = []

    def engine() -> None:
        for _ in range(200):
            results.append(torch.equal(parallel_work(), expected))

    thread = threading.Thread(target=engine)
    thread.start()
    while thread.is_alive():
        parallel_work()  # the caller's team comes back ...
        release_openmp_threads()  # ... and is freed again, mid-computation of the other
    thread.join()
    assert len(results) == 200 and all(results)
