"""Driver cost at scale: many near-empty cells through `study run` against bare Ray Tune.

  bare  - `tune.Tuner` over N trivial function trials (each reports once), actor reuse on,
          Tune's file loggers off: what Ray Tune itself costs per trial on this machine;
  tool  - `study run` over N cells that train almost nothing (digits, 1 epoch, 16 examples,
          1 filter): Tune + the trial function + per-epoch checkpoint + two Parquet parts per
          cell + progress, in a subprocess.
Prints both whole-command wall times and their ratio, the time per trial of each, and peak
memory.

    python benchmarks/scale.py [--cells 1000]
"""
from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BARE = """
import os, sys, time
os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
import ray
from ray import tune
n, storage = int(sys.argv[1]), sys.argv[2]
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
def trial(config):
    tune.report({"x": config["i"]})
t0 = time.perf_counter()
tune.Tuner(tune.with_resources(trial, {"cpu": 1}),
           param_space={"i": tune.grid_search(list(range(n)))},
           tune_config=tune.TuneConfig(reuse_actors=True),
           run_config=tune.RunConfig(storage_path=storage, verbose=0)).fit()
print(time.perf_counter() - t0)
"""


def spec_text(cells: int) -> str:
    # seeds make as many cells as asked, two architectures each
    return f"""
[study]
name = "scale"
[grid]
dataset = "digits"
architecture = ["sequential", "parallel"]
layers = 1
filters = 1
kernel = 1
epochs = 1
batch_size = 16
max_train_examples = 16
val_fraction = 0.01
seed = {list(range(max(1, cells // 2)))}
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=1000)
    args = ap.parse_args()
    n = 2 * max(1, args.cells // 2)
    tmp = Path(tempfile.mkdtemp(prefix="scale-"))
    try:
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", BARE, str(n), str(tmp / "tune")],
                             capture_output=True, text=True, check=True)
        t_bare_cmd = time.perf_counter() - t0
        t_bare = float(out.stdout.strip().splitlines()[-1])
        spec = tmp / "scale.toml"
        spec.write_text(spec_text(n))
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "study.cli", "run", str(spec), "--results",
                            str(tmp / "res"), "--no-figures", "--quiet"],
                           capture_output=True, text=True)
        t_tool = time.perf_counter() - t0
        if r.returncode != 0:
            sys.exit(f"study run failed: {r.stderr[-2000:]}")
        from study.store import Store

        df = Store(tmp / "res").read_trials()
        # first cell's start to last cell's end: the per-trial part, without Ray's start-up
        # (the bare timing starts after ray.init too)
        t_cells = (df["finished_at"].max() - df["started_at"].min()).total_seconds()
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        rows = len(list((tmp / "res" / "trials").glob("*.parquet")))
        print(f"{n} trials, 2 CPUs, actor reuse")
        print(f"bare Ray Tune (trivial trials)   whole command {t_bare_cmd:6.1f} s   "
              f"Tuner.fit {t_bare:6.1f} s = {t_bare / n * 1000:5.1f} ms/trial")
        print(f"study run (near-empty cells)     whole command {t_tool:6.1f} s   "
              f"first cell start to last end {t_cells:6.1f} s = {t_cells / n * 1000:5.1f} ms/trial"
              f"   ({rows} rows landed)")
        print(f"ratio, whole commands: {t_tool / t_bare_cmd:.2f}")
        print(f"peak memory of the largest child process (the study driver or Tune): {peak_mb:.0f} MB")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
