"""Driver cost at scale: many near-empty cells through `study run` against bare Ray Tune.

  bare  - `tune.Tuner` over N trivial function trials that report 20 times each, actor reuse
          on, Tune's file loggers off: what Ray Tune itself costs per trial on this machine;
  tool  - `study run` over N cells that train almost nothing (digits, 20 epochs of 16
          examples, 1 filter, so 20 epoch rows per cell travel to the driver and land, with
          the cell's final row), in a subprocess: Tune + the trial function (which trains,
          evaluates and marks itself in flight on the driver) + the store + progress. Such
          cells are small: the tool runs them up to 32 to a Tune trial (study.bundles), and
          prints how many trials it took.
Both run in this one invocation, one after the other, on a fresh local Ray each (2 CPUs).
Prints whole-command wall times and their ratio, the time from launch to the first trial's
start (the tool's fixed start-up beyond Ray's is the difference), the driver's work per
cell over the run (first cell start to last cell end, per cell, and per cell in the first
and last tenth of the run: constant when the driver's work per cell does not grow with N),
and the peak memory and CPU time of each driver process (per trial: the driver's share of
the machine, taken from the trials).

With --for-s S only the tool runs, and is stopped after S seconds (for sizes too large to
run through here, e.g. 50,000): it prints the time to the first cell and the time between
cell starts over the cells that ran.

Goals (issue #30): whole-command ratio tool / bare <= 0.5 at 6,912 cells; late / early per
cell <= 1.2 (the driver's cost per cell does not grow with the study).

    python benchmarks/scale.py [--cells 1000] [--epochs 20] [--skip-bare] [--for-s S]
                               [--trials-per-fit K]
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BARE = """
import os, resource, sys, time
os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
import ray
from ray import tune
n, storage, epochs = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
# workers at the driver's priority, as the tool runs them (Ray's default is nice 15)
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
         _system_config={"worker_niceness": 0})
def trial(config):
    t = time.time()
    for e in range(epochs):
        tune.report({"x": config["i"], "epoch": e, "t_start": t, "t_end": time.time()})
class Span(tune.Callback):
    first, last = float("inf"), 0.0
    def on_trial_result(self, iteration, trials, trial, result, **info):
        Span.first = min(Span.first, result["t_start"])
        Span.last = max(Span.last, result["t_end"])
t0 = time.perf_counter()
tune.Tuner(tune.with_resources(trial, {"cpu": 1}),
           param_space={"i": tune.grid_search(list(range(n)))},
           tune_config=tune.TuneConfig(reuse_actors=True),
           run_config=tune.RunConfig(storage_path=storage, verbose=0, callbacks=[Span()])).fit()
fit = time.perf_counter() - t0
ru = resource.getrusage(resource.RUSAGE_SELF)
print(fit, Span.first, Span.last, ru.ru_maxrss / 1024, ru.ru_utime + ru.ru_stime)
"""

# The study CLI in-process, reporting its own peak memory and CPU time (not Ray's daemons'),
# and, every 100 landed cells, the wall clock and the process's CPU time (all its threads:
# Tune's loop, landing, compaction) to MARKS, so that the driver's work per cell early and
# late in the run can be compared even on a machine others load.
TOOL = """
import os, resource, runpy, sys, time
import study.store.write as write
import study.executors.ray_tune as ray_tune
if os.environ.get("SCALE_TRIALS_PER_FIT"):  # sizing the executor's fits (--trials-per-fit)
    ray_tune.TRIALS_PER_FIT = int(os.environ["SCALE_TRIALS_PER_FIT"])
trials, suggest = [0], ray_tune.CellSearcher.suggest
def counted(self, trial_id):  # Tune trials the cells ran in (bundles: study.bundles)
    got = suggest(self, trial_id)
    trials[0] += isinstance(got, dict)
    return got
ray_tune.CellSearcher.suggest = counted
marks, every, landed = open(os.environ["SCALE_MARKS"], "w"), 100, [0]
land = write.Writer.write_result
def write_result(self, row, epochs):
    land(self, row, epochs)
    landed[0] += 1
    if landed[0] % every == 0:
        print(landed[0], time.time(), time.process_time(), file=marks, flush=True)
write.Writer.write_result = write_result
sys.argv = ["study"] + sys.argv[1:]
try:
    runpy.run_module("study.cli", run_name="__main__")
finally:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print("PEAK_MB", ru.ru_maxrss / 1024, "CPU_S", ru.ru_utime + ru.ru_stime, "TRIALS", trials[0],
          file=sys.stderr)
"""


def per_cell_early_late(marks_path: Path) -> str:
    """The driver's CPU and wall time per landed cell over the first and the last tenth of
    the landings (from TOOL's marks)."""
    rows = [tuple(map(float, line.split())) for line in marks_path.read_text().splitlines()
            if len(line.split()) == 3]
    if len(rows) < 4:
        return "  too few landings for early/late driver figures"
    k = max(2, len(rows) // 10)

    def per_cell(a, b, col):
        return (b[col] - a[col]) / (b[0] - a[0]) * 1000
    early, late = (rows[0], rows[k - 1]), (rows[-k], rows[-1])
    ce, cl = per_cell(*early, 2), per_cell(*late, 2)
    we, wl = per_cell(*early, 1), per_cell(*late, 1)
    return (f"  driver per landed cell, cells {int(early[0][0])}-{int(early[1][0])} vs "
            f"{int(late[0][0])}-{int(late[1][0])}: CPU {ce:.1f} vs {cl:.1f} ms (late / early "
            f"{cl / ce:.2f}), wall {we:.1f} vs {wl:.1f} ms (late / early {wl / we:.2f}; goal <= 1.2)")


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process so far (/proc/PID/stat), nan where gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def spec_text(cells: int, epochs: int) -> str:
    # seeds make as many cells as asked, two architectures each; 2 layers, so that no cell is
    # a same-network copy (recorded without training) and the tool runs every trial
    return f"""
[study]
name = "scale"
[grid]
dataset = "digits"
architecture = ["sequential", "parallel"]
layers = 2
filters = 1
kernel = 1
epochs = {epochs}
batch_size = 16
max_train_examples = 16
val_fraction = 0.01
seed = {list(range(max(1, cells // 2)))}
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--skip-bare", action="store_true", help="only the tool")
    ap.add_argument("--for-s", type=float, help="only the tool, stopped after this many seconds")
    ap.add_argument("--trials-per-fit", type=int,
                    help="the tool's trials per Tuner.fit (study.executors.ray_tune.TRIALS_PER_FIT)")
    args = ap.parse_args()
    if args.for_s:
        args.skip_bare = True
    n = 2 * max(1, args.cells // 2)
    tmp = Path(tempfile.mkdtemp(prefix="scale-"))
    try:
        print(f"{n} trials, {args.epochs} reports/epoch rows each, 2 CPUs, actor reuse", flush=True)
        if not args.skip_bare:
            launched = time.time()
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", BARE, str(n), str(tmp / "tune"),
                                  str(args.epochs)], capture_output=True, text=True)
            t_bare_cmd = time.perf_counter() - t0
            if out.returncode != 0:
                sys.exit(f"bare Tune failed: {out.stderr[-2000:]}")
            fit, first, last, bare_mb, bare_cpu = map(float, out.stdout.strip().splitlines()[-1].split())
            print(f"bare Ray Tune (trivial trials)  whole command {t_bare_cmd:7.1f} s   "
                  f"launch to first trial {first - launched:5.1f} s   "
                  f"first start to last end {last - first:7.1f} s = "
                  f"{(last - first) / n * 1000:5.1f} ms/trial   driver peak {bare_mb:5.0f} MB   "
                  f"driver CPU {bare_cpu / n * 1000:5.1f} ms/trial", flush=True)
        spec = tmp / "scale.toml"
        spec.write_text(spec_text(n, args.epochs))
        launched = time.time()
        t0 = time.perf_counter()
        marks = tmp / "marks.txt"
        proc = subprocess.Popen([sys.executable, "-c", TOOL, "run", str(spec), "--results",
                                 str(tmp / "res"), "--no-figures", "--quiet"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, env={**os.environ, "SCALE_MARKS": str(marks),
                                     **({"SCALE_TRIALS_PER_FIT": str(args.trials_per_fit)}
                                        if args.trials_per_fit else {})})
        cpu_s = float("nan")
        try:
            _, err = proc.communicate(timeout=args.for_s)
        except subprocess.TimeoutExpired:
            cpu_s = proc_cpu_s(proc.pid)  # the driver's own, before it is stopped
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started
            _, err = proc.communicate()
        t_tool = time.perf_counter() - t0
        if proc.returncode != 0 and not args.for_s:
            sys.exit(f"study run failed: {err[-2000:]}")
        peak_mb = float(err.rsplit("PEAK_MB", 1)[1].split()[0]) if "PEAK_MB" in err else float("nan")
        if "CPU_S" in err:
            cpu_s = float(err.rsplit("CPU_S", 1)[1].split()[0])
        n_trials = int(err.rsplit("TRIALS", 1)[1].split()[0]) if "TRIALS" in err else None
        from study.store import Store

        store = Store(tmp / "res")
        df = store.read_trials().sort_values("started_at")
        n_epochs = len(store.read_epochs())
        first = df["started_at"].min().timestamp()
        span = (df["finished_at"].max() - df["started_at"].min()).total_seconds()
        # driver work per cell early and late in the run: the mean gap between cell starts
        k = max(2, len(df) // 10)
        starts = df["started_at"].map(lambda t: t.timestamp()).to_numpy()
        early = (starts[k - 1] - starts[0]) / (k - 1) * 1000
        late = (starts[-1] - starts[-k]) / (k - 1) * 1000
        print(f"study run (near-empty cells)    whole command {t_tool:7.1f} s   "
              f"launch to first cell  {first - launched:5.1f} s   "
              f"first start to last end {span:7.1f} s = {span / len(df) * 1000:5.1f} ms/cell    "
              f"driver peak {peak_mb:5.0f} MB")
        print(f"  {len(df)} rows and {n_epochs} epoch rows landed"
              + (f" from {n_trials} Tune trials (--bundle auto)" if n_trials else "")
              + "; ms between cell starts: "
              f"first tenth {early:.1f}, last tenth {late:.1f}, late / early {late / early:.2f} "
              f"(goal <= 1.2)")
        print(f"  driver CPU {cpu_s:.1f} s = {cpu_s / len(df) * 1000:.1f} ms per landed cell "
              f"(the study run process: start-up, Tune's driver loop, landing, compaction)")
        print(per_cell_early_late(marks))
        if not args.skip_bare:
            print(f"ratio, whole commands (tool / bare): {t_tool / t_bare_cmd:.2f} (goal <= 0.5)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
