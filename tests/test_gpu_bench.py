"""benchmarks/gpu.py without a GPU: it says so and exits 0 (fast); its sample is a spread of
real paper-preset MNIST pairs."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU path needs a machine without CUDA")
def test_gpu_benchmark_without_a_gpu_says_so_and_exits_0():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py")], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "no CUDA GPU on this machine" in r.stdout and "Traceback" not in r.stderr


def test_gpu_benchmark_samples_paper_pairs_small_to_large():
    import gpu
    from sweep.cost import cell_flops
    from sweep.params import ARCH_SPECIFIC

    pairs = gpu.sample_pairs(3, epochs=1, max_train=1000)
    flops = [cell_flops(s) for s, _ in pairs]
    assert flops == sorted(flops) and flops[0] < flops[-1]
    for s, p in pairs:
        assert (s["architecture"], p["architecture"]) == ("sequential", "parallel")
        assert s["layers"] > 1 and s["dataset"] == "mnist" and s["epochs"] == 1
        shared = [k for k in s if k != "architecture" and k not in ARCH_SPECIFIC]
        assert {k: s[k] for k in shared} == {k: p[k] for k in shared}
