"""A cluster without a shared disk, on one machine (issue: real clusters).

The head node runs no trials (`--num-cpus 0`); the worker node runs inside a private mount
namespace where an empty tmpfs hides the driver's results and data folders, with its own Ray
temp dir, so every cell runs where the driver's paths do not exist. The worker's own view of
those folders is read through /proc/<its raylet pid>/root. Every Ray process is stopped by
PID (never `ray stop`), and the cluster's address file lives in a private RAY_TMPDIR so no
other `ray.init()` on this machine can attach to it.
"""
from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from study.store import Store
from sweep import load_spec

from conftest import checkpointed_in_flight, run_cli
from procs import _procs, freeze_when, kill_tree

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))

SPEC = """
[study]
name = "cluster"
save_weights = true

[grid]
dataset = "mnist"
architecture = ["sequential", "parallel"]
layers = [1, 2, 3]
filters = 8
kernel = 3
epochs = 12
batch_size = 64
lr = 1e-2
max_train_examples = 600
seed = [0, 1]
"""


# Polls the head until N nodes are alive, for at most TIMEOUT seconds: ADDRESS N TIMEOUT.
_WAIT_FOR_NODES = """
import sys, time, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
want, deadline = int(sys.argv[2]), time.monotonic() + float(sys.argv[3])
while (alive := sum(1 for n in ray.nodes() if n["Alive"])) < want:
    if time.monotonic() > deadline:
        sys.exit(f"{alive} of {want} Ray nodes alive after {sys.argv[3]} s")
    time.sleep(0.1)
"""


def _why_no_cluster() -> str | None:
    if os.geteuid() != 0:
        return "needs root (mount a tmpfs in a private mount namespace); CI runs as root"
    if not shutil.which("unshare"):
        return "needs unshare(1) (util-linux) for a private mount namespace"
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True)
    if r.returncode != 0:
        return f"unshare -m is refused here: {r.stderr.decode().strip()}"
    return None


needs_cluster = pytest.mark.skipif(_why_no_cluster() is not None, reason=str(_why_no_cluster()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _raylet_pid(temp_dir: str) -> int | None:
    for pid, (_, cmd) in _procs().items():
        if "raylet" in cmd.split(" ")[0] and temp_dir in cmd:
            return pid
    return None


def _files_under(path: Path) -> list[str]:
    return sorted(str(p) for p in path.rglob("*")) if path.exists() else []


class Cluster:
    real_mnist = False

    def __init__(self, base: str, results: Path, data: Path):
        self.base, self.results, self.data = base, results, data
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        # token authentication on every node and the driver; the token lives in this
        # cluster's own folder, never in the user's ~/.ray/auth_token
        token = Path(base) / "auth_token"
        token.write_text(secrets.token_hex(32))
        self.env = {**os.environ, "RAY_TMPDIR": base, "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN_PATH": str(token),
                    "PYTHONPATH": str(ROOT)}  # "this package installed" on every node
        self.env.pop("RAY_AUTH_TOKEN", None)
        self.workers: dict[str, int] = {}

    def start_head(self) -> None:
        subprocess.run([RAY, "start", "--head", f"--port={self.port}", "--num-cpus=0",
                        f"--temp-dir={self.base}/h", "--include-dashboard=false",
                        "--disable-usage-stats"], env=self.env, check=True, capture_output=True,
                       timeout=180)

    def start_worker(self, name: str, *ray_args: str) -> int:
        """A worker node that cannot see the driver's results and data folders."""
        tmp = f"{self.base}/{name}"
        script = (f"mount -t tmpfs none {self.results} && mount -t tmpfs none {self.data} && "
                  f"exec {RAY} start --address={self.address} --temp-dir={tmp} "
                  + " ".join(ray_args))
        subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                       env=self.env, check=True, capture_output=True, timeout=180)
        for _ in range(100):
            pid = _raylet_pid(tmp)
            if pid:
                self.workers[name] = pid
                self.wait_for_alive_nodes(1 + len(self.workers))  # the head and each worker
                return pid
            time.sleep(0.2)
        raise AssertionError(f"worker node {name} has no raylet")

    def wait_for_alive_nodes(self, n: int, timeout: float = 120) -> None:
        """Until the head lists `n` nodes alive (a node's raylet runs before it registers),
        asked by a short-lived driver of its own."""
        r = subprocess.run([sys.executable, "-c", _WAIT_FOR_NODES, self.address, str(n),
                            str(timeout)], env=self.env, capture_output=True, text=True,
                           timeout=timeout + 60)
        assert r.returncode == 0, r.stderr

    def worker_view(self, name: str, path: Path) -> Path:
        return Path(f"/proc/{self.workers[name]}/root") / str(path).lstrip("/")

    def stop(self) -> None:
        kill_tree(marker=self.base)  # by PID: every process of this cluster, nothing else


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("overhead", ROOT / "benchmarks" / "overhead.py")
    overhead = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(overhead)
    root = tmp_path_factory.mktemp("cluster")
    results, data = root / "res", root / "data"
    results.mkdir()
    # real MNIST images (next to the checkout, or next to its worktree folder) when present
    real = [m for m in (overhead.MNIST, ROOT.parents[1] / "shared" / "data" / "mnist")
            if (m / "t10k-images-idx3-ubyte.gz").is_file()]
    if real:
        overhead.MNIST = real[0]
        overhead.make_mnist_folder(data)
    else:  # random images in MNIST's layout: the files' location is what counts here
        from test_train import make_mnist
        make_mnist(data, n_train=600, n_test=100)
    Cluster.real_mnist = bool(real)
    base = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's socket paths are capped
    c = Cluster(base, results, data)
    try:
        c.start_head()
        c.start_worker("w", "--num-cpus=2")
        yield c
    finally:
        c.stop()
        shutil.rmtree(base, ignore_errors=True)


def _rows(store: Store) -> dict[str, str]:
    """cell_id -> its trial row, spelled out."""
    return {r["cell_id"]: repr(sorted(r.items())) for r in store.read_trials().to_dict("records")}


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "study.cli", *map(str, args)]


@pytest.mark.slow
@needs_cluster
def test_no_shared_disk_driver_killed_and_resumed(cluster, tmp_path):
    spec_path = tmp_path / "cluster.toml"
    spec_path.write_text(SPEC)
    spec = load_spec(spec_path)
    out, store = cluster.results, Store(cluster.results)
    env = {**cluster.env, "STUDY_CHECKPOINT_EVERY_S": "0"}
    args = ("--data-dir", cluster.data, "--address", cluster.address, "--no-figures")
    driver = subprocess.Popen(_cli("run", spec_path, "--results", out, *args), env=env,
                              start_new_session=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        def landed_and_checkpointed():
            return bool(store.part_ids(store.trials_dir) and checkpointed_in_flight(store))
        freeze_when(driver, landed_and_checkpointed, 300, "a landed row and a checkpoint in flight")
        kill_tree(driver.pid)  # the driver only: the cluster lives on
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()
    before = _rows(store)  # compaction moves rows between files: compare rows, not files
    interrupted = set(store.in_flight())
    # a cell marks itself in flight when it starts; those with a checkpoint resume from it
    checkpointed = set(checkpointed_in_flight(store))
    assert checkpointed
    assert interrupted and len(before) < len(spec.cells())
    st = json.loads(run_cli("status", out, "--json").stdout)
    assert st["running"] == 0 and st["interrupted"] == len(interrupted), st

    r = run_cli("resume", out, *args, env=env)
    assert r.returncode == 0, r.stderr
    df = store.read_trials()
    assert sorted(df["cell_id"]) == sorted(c.cell_id for c in spec.cells())  # none lost or twice
    assert (df["status"] == "ok").all() and (df["epochs_done"] == 12).all()
    after = _rows(store)
    assert all(after.get(c) == row for c, row in before.items())  # landed rows untouched
    resumed = df.set_index("cell_id").loc[sorted(checkpointed - set(before))]
    assert len(resumed) and (resumed["resumed_from_epoch"] > 0).all()
    ep = store.read_epochs()
    assert len(ep) == 12 * len(df) and not ep.duplicated(["cell_id", "epoch"]).any()
    # every cell ran on the worker node, and learned (chance is 0.1) from data the driver shipped
    assert df["node_id"].nunique() == 1
    assert (df["val_acc"] > 0.15).all() or not cluster.real_mnist, df["val_acc"]
    # the driver holds the whole study: weights here, checkpoints gone, none on the worker
    # (a same-network copy's row points at no file: its network's weights are its trained cell's)
    trained = df[df["same_network_as"].isna()]
    assert df.loc[df["same_network_as"].notna(), "weights_path"].isna().all()
    assert sorted(trained["weights_path"]) == sorted(f"weights/{c}.pt" for c in trained["cell_id"])
    assert all((out / w).stat().st_size > 0 for w in trained["weights_path"])
    assert not store.checkpoints_dir.exists()
    assert _files_under(cluster.worker_view("w", out)) == []
    assert _files_under(cluster.worker_view("w", cluster.data)) == []  # and it had no data
    assert (cluster.data / "MNIST").is_dir()  # (while the driver has it)
    r = run_cli("lesion", out, "--data-dir", cluster.data)  # finds every saved network
    assert r.returncode == 0 and "evaluations" in r.stdout, r.stderr


@pytest.mark.slow
@needs_cluster
def test_trial_sizes_the_cluster_cannot_hold_are_refused(cluster, tmp_path):
    spec_path = tmp_path / "c.toml"
    spec_path.write_text(SPEC)
    for flags, says in ((["--gpus-per-trial", "1"], "asks for GPUs but the cluster has 2 CPUs "
                                                    "and 0 GPUs on 2 nodes"),
                        (["--cpus-per-trial", "8"], "no node can hold a trial of 8 CPUs")):
        out = tmp_path / f"res{flags[1]}"
        t0 = time.time()
        r = run_cli("run", spec_path, "--results", out, "--data-dir", cluster.data,
                    "--address", cluster.address, *flags, env=cluster.env, timeout=120)
        assert r.returncode == 3, r.stderr
        assert says in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not out.exists() and time.time() - t0 < 60  # nothing written, no waiting


@pytest.mark.slow
@needs_cluster
def test_a_driver_without_the_token_is_refused_in_one_line(cluster, tmp_path):
    spec_path = tmp_path / "c.toml"
    spec_path.write_text(SPEC)
    wrong = tmp_path / "wrong_token"
    wrong.write_text(secrets.token_hex(32))
    for name, env in (("a wrong token", {**cluster.env, "RAY_AUTH_TOKEN_PATH": str(wrong)}),
                      ("no token", {**cluster.env, "RAY_AUTH_TOKEN_PATH": str(tmp_path / "none"),
                                    "HOME": str(tmp_path)})):
        out = tmp_path / "res"
        t0 = time.time()
        r = run_cli("run", spec_path, "--results", out, "--data-dir", cluster.data,
                    "--address", cluster.address, env=env, timeout=120)
        took = time.time() - t0
        print(f"{name}: exit {r.returncode} after {took:.1f} s: {r.stderr.strip()}")
        assert r.returncode == 3, r.stderr
        assert "RAY_AUTH_MODE=token" in r.stderr and "RAY_AUTH_TOKEN_PATH" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not out.exists() and took < 60  # Ray gives up after ~20 s; CI cores are busy


@pytest.mark.slow
@needs_cluster
@pytest.mark.parametrize("fuse, cells, trials", [("off", 4, 4), ("2", 8, 4)])
def test_fractional_gpus_pack_trials_on_one_gpu(cluster, tmp_path, fuse, cells, trials):
    """--gpus-per-trial 0.25 puts four trials on one GPU; with --fuse 2 each trial is a group
    of two cells. What is tested is what Ray scheduled, not a clock: the first four trials
    wait at a barrier (STUDY_TRIAL_BARRIER) until all four run, and the driver's record of
    the trials it saw running at once (Tune's trial starts and ends) says how many did."""
    # A node that says it has one GPU (torch sees none here): Ray schedules by GPU share.
    if "g" not in cluster.workers:
        cluster.start_worker("g", "--num-cpus=4", "--num-gpus=1")
    spec_path = tmp_path / "g.toml"
    spec_path.write_text(SPEC.replace("save_weights = true", "save_weights = false")
                         .replace("layers = [1, 2, 3]", "layers = [2, 3, 4, 5]"))
    out = tmp_path / "res"
    r = run_cli("run", spec_path, "--results", out, "--data-dir", cluster.data, "--address",
                cluster.address, "--gpus-per-trial", "0.25", "--fuse", fuse, "--no-figures",
                env={**cluster.env, "STUDY_TRIAL_BARRIER": "4"})
    assert r.returncode == 0, r.stderr
    df = Store(out).read_trials()
    assert len(df) == 16 and (df["status"] == "ok").all() and df["node_id"].nunique() == 1
    assert (df["group_size"] == int(fuse if fuse != "off" else 1)).all()
    assert f"at most {cells} cells in {trials} trials ran at once" in r.stdout, r.stdout


def test_the_driver_never_imports_torch():
    # torch loads only where a cell trains: the driver's start-up stays Ray's own
    code = ("import sys, study.cli, study.runner, study.executors.ray_tune, study.data, "
            "study.store; "
            "study.data.load_raw('digits'); print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr
