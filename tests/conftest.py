"""Shared fixtures: a real local Ray cluster for the session, tiny specs, tiny datasets."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TINY_SPEC = """
[study]
name = "tiny"

[grid]
dataset = "digits"
architecture = ["sequential", "parallel"]
layers = [1, 2]
filters = 4
kernel = 3
epochs = 2
batch_size = 64
lr = 3e-3
max_train_examples = 200
"""


@pytest.fixture(scope="session")
def ray_session():
    """One real local Ray for every test that needs it (started once: ~10 s)."""
    import ray
    from study.executors.ray_connect import ensure_ray

    started = ensure_ray(None, num_cpus=2)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture
def tiny_spec(tmp_path) -> Path:
    p = tmp_path / "tiny.toml"
    p.write_text(TINY_SPEC)
    return p


def run_cli(*args, cwd=None, env=None, timeout=600) -> subprocess.CompletedProcess:
    """The real `study` command in a subprocess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "study.cli", *map(str, args)], cwd=cwd,
                          env=full_env, capture_output=True, text=True, timeout=timeout)


def checkpointed_in_flight(store) -> list[str]:
    """Cells in flight with a non-empty checkpoint (the ones a resume continues); a checkpoint
    removed since it was listed (its row landed in between) counts as none."""
    def size(path: Path) -> int:
        try:
            return path.stat().st_size
        except FileNotFoundError:
            return 0
    return [c for c in store.in_flight() if size(store.checkpoint_path(c)) > 0]
