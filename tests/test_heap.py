"""glibc's heap keeps what a forward pass frees for the next one, instead of faulting fresh pages in each time."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rerank_core.heap import glibc

REPO = Path(__file__).resolve().parent.parent

# Ten 2 MiB activations and a 3 MiB one, freed and allocated again four times, as passes do; prints the page
# faults of those four rounds. Each run is a fresh process: the settings are the process's.
_ROUNDS = textwrap.dedent("""
    import resource, sys, torch
    from rerank_core.heap import reuse_freed_activations
    if sys.argv[1] == "tuned":
        assert reuse_freed_activations()
    def one_pass():
        activations = [torch.ones(2 * 1024**2 // 4 + 1000) for _ in range(10)]
        activations.append(torch.ones(3 * 1024**2 // 4))
    one_pass()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        one_pass()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _page_faults(mode: str) -> int:
    result = subprocess.run([sys.executable, "-c", _ROUNDS, mode], cwd=REPO, capture_output=True, text=True,
                            timeout=120, check=True)
    return int(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(glibc() is None, reason="mallopt is glibc's")
def test_freed_activations_are_reused_not_faulted_in_again() -> None:
    default, tuned = _page_faults("default"), _page_faults("tuned")
    # 23 MiB a round is ~5,900 pages: glibc's adaptive thresholds give them back and fault them in every round.
    assert default > 4 * 4000, default
    assert tuned < default / 10, (tuned, default)
