"""How to run a cell (not part of its identity): torch-free, so the driver never imports torch.

A `study run`'s options (runner.RunOptions) hold these as `trial`: the folders, the download
flag and the retries are given once, here, for the driver and every cell.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrialOptions:
    results_dir: str
    study: str = ""
    data_dir: str | None = None
    download: bool = False
    threads: int = 1
    max_failures: int = 2  # retries of a cell that raises, before it is recorded as failed
    save_weights: bool = False
    device: str = "auto"  # auto = cuda when this worker has a GPU
    # How the parallel net's body runs (study.models.residual): "loop" or "wide"; the same
    # network either way. The loop stays the default until a GPU benchmark shows wide faster.
    parallel_body: str = "loop"
    # torch.backends.cudnn.benchmark; off (the default) until benchmarks/gpu.py shows it pays.
    cudnn_benchmark: bool = False
    # At most one checkpoint per this many seconds of a cell's training (0: every epoch): a
    # resume loses at most that much work, and the loop pays for no more than that.
    checkpoint_every_s: float = 30.0
    # Test hook: "key=value[,key=value]@EPOCH[xTIMES]" raises in matching cells at EPOCH on
    # the first TIMES attempts (default: every attempt). Set from STUDY_INJECT_FAULT.
    inject_fault: str | None = None
    # Test hook: while this file exists (a path on the worker's own machine: the tests run
    # on one), every epoch first waits train.EPOCH_HOLD_S. A test keeps cells in flight for
    # as long as it needs, whatever the machine's speed, then removes the file and the
    # cells finish at full speed. Set from STUDY_EPOCH_HOLD.
    epoch_hold: str | None = None
    # Test hook (study.fused.drift): move every initial weight this many ulps (toward +inf;
    # negative: toward -inf) right after the build, to measure how far one-ulp differences
    # grow over a cell. 0 leaves the build untouched.
    init_ulps: int = 0
