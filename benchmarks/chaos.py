"""Chaos at scale: a study that loses its driver K times and two worker nodes, then finishes.

On one machine: a Ray head with no CPUs for trials and two worker nodes (1 CPU each), each
in a private mount namespace where an empty tmpfs hides the driver's results and data
folders (as tests/test_cluster.py does), every node and the driver with token
authentication on and a token made in this run's own temp folder. `study run` drives N
near-empty cells (digits, 1 filter, 16 examples, E epochs each); the driver is SIGKILLed K
times, each when a seeded random share of the cells has landed (plus a random 0-2 s), and
`study resume` starts it again; along the way worker node 1 is killed and started again,
worker node 2 is killed for good (the study finishes on what is left). A last `resume` runs
to the end. Then the counts, read straight from the Parquet files with pyarrow and with
DuckDB: rows, distinct cells, epoch rows against N x E (and distinct (cell, epoch) pairs),
statuses, quarantined files, checkpoints left. Exit 1 on any loss or duplicate.

Needs root (mount namespaces) and unshare(1); says so and exits 2 without them. Every Ray
process it starts is stopped by PID at the end. The kill plan is printed with its seed:
`--seed S` replays it.

    python benchmarks/chaos.py [--cells 2000] [--kills 3] [--epochs 10] [--seed 0]
                               [--fuse K|auto|off] [--bundle N|auto|off]
"""
from __future__ import annotations

import argparse
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
RAY = str(Path(sys.executable).with_name("ray"))

from procs import _procs, kill_tree  # noqa: E402  (/proc, by PID; never `ray stop`)


def spec_text(cells: int, epochs: int) -> str:
    # seeds make the cells, two architectures each; layers 2: no same-network copies
    return f"""
[study]
name = "chaos"
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


def why_not() -> str | None:
    if os.geteuid() != 0:
        return "chaos.py needs root (a private mount namespace per worker node); run it as root"
    if not shutil.which("unshare"):
        return "chaos.py needs unshare(1) (util-linux)"
    if subprocess.run(["unshare", "-m", "--propagation", "private", "true"]).returncode:
        return "chaos.py: unshare -m is refused here"
    return None


class Cluster:
    def __init__(self, base: Path, results: Path, data: Path):
        self.base, self.results, self.data = base, results, data
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.address = f"127.0.0.1:{s.getsockname()[1]}"
        token = base / "auth_token"
        token.write_text(secrets.token_hex(32))
        self.env = {**os.environ, "RAY_TMPDIR": str(base), "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN_PATH": str(token), "PYTHONPATH": str(ROOT),
                    "STUDY_CHECKPOINT_EVERY_S": "0"}
        self.env.pop("RAY_AUTH_TOKEN", None)

    def start_head(self) -> None:
        subprocess.run([RAY, "start", "--head", f"--port={self.address.split(':')[1]}",
                        "--num-cpus=0", f"--temp-dir={self.base}/h", "--include-dashboard=false",
                        "--disable-usage-stats"], env=self.env, check=True, capture_output=True,
                       timeout=180)

    def start_worker(self, name: str) -> None:
        script = (f"mount -t tmpfs none {self.results} && mount -t tmpfs none {self.data} && "
                  f"exec {RAY} start --address={self.address} --temp-dir={self.base}/{name} "
                  "--num-cpus=1")
        subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                       env=self.env, check=True, capture_output=True, timeout=180)

    def kill_worker(self, name: str) -> int:
        return kill_tree(marker=f"{self.base}/{name}")

    def stop(self) -> None:
        kill_tree(marker=str(self.base))


def landed(results: Path) -> int:
    """Distinct cells with a row: a compaction holds a cell in a merged file and its part for
    a moment, so rows alone overcount."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    files = sorted(str(p) for p in (results / "trials").glob("*.parquet"))
    try:
        return len(pc.unique(ds.dataset(files).to_table(columns=["cell_id"])["cell_id"])) \
            if files else 0
    except (OSError, ValueError):  # a file renamed away under us: next time
        return 0


def drive(cluster: Cluster, cmd: list[str], until: int | None, extra_s: float, events, log):
    """Start the driver; SIGKILL it once `until` rows have landed (+extra_s); None: let it
    finish. `events`: (rows, action) done to worker nodes on the way. Returns its exit code."""
    t0 = time.time()
    if until is not None:  # each driver lands something before it dies
        until = max(until, landed(cluster.results) + 1)
    with open(log, "a") as err:
        driver = subprocess.Popen(cmd, env=cluster.env, stdout=err, stderr=err,
                                  start_new_session=True)
        while driver.poll() is None:
            n = landed(cluster.results)
            while events and n >= events[0][0]:
                rows, what, act = events.pop(0)
                print(f"  at {n} cells landed: {what} ({act()} processes)", flush=True)
            if until is not None and n >= until:
                time.sleep(extra_s)
                kill_tree(driver.pid)
                driver.wait()
                print(f"  driver SIGKILLed at {landed(cluster.results)} cells landed, "
                      f"{time.time() - t0:.0f} s after its start", flush=True)
                return -signal.SIGKILL
            time.sleep(1)
    print(f"  driver exited {driver.returncode} after {time.time() - t0:.0f} s", flush=True)
    return driver.returncode


def counts(results: Path, n: int, epochs: int, cell_ids: set[str]) -> list[str]:
    """Print the counts; return what is wrong (empty: nothing lost, nothing twice)."""
    import duckdb
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    trials = pq.ParquetDataset(sorted(str(p) for p in (results / "trials").glob("*.parquet"))).read()
    ep = pq.ParquetDataset(sorted(str(p) for p in (results / "epochs").glob("*.parquet"))).read(
        columns=["cell_id", "epoch"])
    ids = pc.unique(trials["cell_id"]).to_pylist()
    con = duckdb.connect()
    t_glob, e_glob = results / "trials" / "*.parquet", results / "epochs" / "*.parquet"
    d_rows, d_cells = con.execute(f"SELECT count(*), count(DISTINCT cell_id) FROM "
                                  f"read_parquet('{t_glob}', union_by_name=true)").fetchone()
    d_ep, d_pairs = con.execute(f"SELECT count(*), count(DISTINCT (cell_id, epoch)) FROM "
                                f"read_parquet('{e_glob}', union_by_name=true)").fetchone()
    statuses = dict(zip(*[c.to_pylist() for c in pc.value_counts(trials["status"]).flatten()]))
    quarantined = sorted(p.name for p in (results / "quarantine").glob("*")) \
        if (results / "quarantine").exists() else []
    left = list((results / "checkpoints").glob("*.pt")) if (results / "checkpoints").exists() else []
    print(f"rows: {trials.num_rows} (pyarrow), {d_rows} (DuckDB) for {n} cells")
    print(f"distinct cells: {len(ids)} (pyarrow), {d_cells} (DuckDB); "
          f"missing from the grid: {len(cell_ids - set(ids))}, outside it: {len(set(ids) - cell_ids)}")
    print(f"epoch rows: {ep.num_rows} (pyarrow), {d_ep} (DuckDB), distinct (cell, epoch): "
          f"{d_pairs}; N x epochs = {n * epochs}")
    print(f"statuses: {statuses}")
    if "group_size" in trials.column_names:  # how the cells trained (--fuse)
        sizes = dict(zip(*[c.to_pylist() for c in pc.value_counts(trials["group_size"]).flatten()]))
        print(f"cells by trained group size: {dict(sorted(sizes.items(), key=lambda t: t[0] or 0))}")
    print(f"quarantined files: {len(quarantined)}" + (f" {quarantined}" if quarantined else ""))
    print(f"checkpoints left: {len(left)}")
    wrong = []
    if not (trials.num_rows == d_rows == len(ids) == d_cells == n) or set(ids) != cell_ids:
        wrong.append("rows or cells lost or twice")
    if not (ep.num_rows == d_ep == d_pairs == n * epochs):
        wrong.append("epoch rows lost or twice")
    if statuses != {"ok": n}:
        wrong.append("a status other than ok")
    return wrong


def plan(rng: random.Random, n: int, kills: int) -> tuple[list[int], list[float], list[int]]:
    """Rows landed at each driver kill (sorted, distinct), the extra seconds after each, and
    the rows at which worker 1 is lost (and restarted) and worker 2 is lost for good."""
    at = sorted(rng.sample(range(max(1, n // 20), max(2, n * 17 // 20)), kills))
    extra = [round(rng.uniform(0, 2), 2) for _ in at]
    workers = sorted(rng.sample(range(max(1, n // 10), max(2, n * 7 // 10)), 2))
    return at, extra, workers


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=2000)
    ap.add_argument("--kills", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fuse", default="auto",
                    help="study run's --fuse: K trains K cells per trial as one fused group "
                         "(default auto: one cell per trial on these CPU nodes)")
    ap.add_argument("--bundle", default="auto",
                    help="study run's --bundle: small cells up to N to a trial (default auto; "
                         "off: one cell per trial, each landing on its own)")
    args = ap.parse_args(argv)
    if why := why_not():
        print(why, file=sys.stderr)
        return 2
    n = 2 * max(1, args.cells // 2)
    at, extra, (w1_at, w2_at) = plan(random.Random(args.seed), n, args.kills)
    print(f"chaos: {n} cells x {args.epochs} epochs, --fuse {args.fuse}, --bundle "
          f"{args.bundle}; seed {args.seed}: "
          "driver SIGKILLed at "
          f"{at} cells landed (+{extra} s); worker 1 killed and restarted at {w1_at} cells, "
          f"worker 2 killed for good at {w2_at} cells", flush=True)
    base = Path(tempfile.mkdtemp(prefix="ch", dir="/tmp"))  # short: Ray's socket paths
    results, data = base / "driver" / "res", base / "driver" / "data"
    results.mkdir(parents=True)
    data.mkdir()
    spec = base / "chaos.toml"
    spec.write_text(spec_text(n, args.epochs))
    cluster = Cluster(base, results, data)
    log = base / "drivers.log"
    t0 = time.time()
    try:
        cluster.start_head()
        cluster.start_worker("w1")
        cluster.start_worker("w2")
        print(f"cluster up in {time.time() - t0:.0f} s: head (0 CPUs) + 2 worker nodes "
              f"(1 CPU each), token auth on; driver log {log}", flush=True)

        def lose_and_restart():
            k = cluster.kill_worker("w1")
            cluster.start_worker("w1")
            return k
        events = sorted([(w1_at, "worker 1 killed and restarted", lose_and_restart),
                         (w2_at, "worker 2 killed for good", lambda: cluster.kill_worker("w2"))],
                        key=lambda e: e[0])
        common = ["--data-dir", str(data), "--address", cluster.address, "--no-figures",
                  "--quiet", "--max-failures", "5", "--fuse", str(args.fuse),
                  "--bundle", str(args.bundle)]
        py = [sys.executable, "-m", "study.cli"]
        runs = [py + ["run", str(spec), "--results", str(results), *common]]
        runs += [py + ["resume", str(results), *common]] * len(at)
        for i, cmd in enumerate(runs):
            print(f"driver {i + 1}: study {cmd[3]}", flush=True)
            until = at[i] if i < len(at) else None
            rc = drive(cluster, cmd, until, extra[i] if until is not None else 0, events, log)
        if rc != 0:  # the last one ran to its end
            print(f"the last driver exited {rc}: see {log}")
        for _, what, act in events:  # not reached before the end: still done, for the record
            print(f"  after the end: {what} ({act()} processes)")
        print(f"wall: {time.time() - t0:.0f} s")
        from sweep import load_spec

        wrong = counts(results, n, args.epochs, {c.cell_id for c in load_spec(spec).cells()})
    finally:
        cluster.stop()
    left = [p for p, (_, cmd) in _procs().items() if str(base) in cmd]
    print(f"Ray processes left running: {len(left)}")
    if wrong or rc != 0:
        print("FAILED: " + "; ".join(wrong or [f"last driver exit {rc}"]) + f" (kept {base})")
        return 1
    shutil.rmtree(base, ignore_errors=True)
    print("OK: every cell exactly once, every epoch exactly once, all ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
