"""How to run the pending cells: in-process one after another, or as Ray Tune trials.

Both run `train.run_cell` and hand each finished (row, epochs) to the driver's `land`; both
have the one signature of study.executor_registry, where they are registered by name.

Under Ray nothing assumes a shared disk: the driver ships the cell table and the datasets
through Ray's object store once, and on a cluster (--address) a small actor pinned to the
driver's node (DriverFiles) writes and reads the checkpoints and final weights in the
driver's results folder (on the one-node Ray the tool starts itself, trials write there
directly). Workers need this package and torch, nothing else. No torch is imported here
(the driver never trains); the trial function imports it on the worker.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import shutil
import socket
import tempfile
import time
from typing import Callable

# What the tool needs set in every Ray process: in the driver before Ray is imported (some
# are read at import time), and in the workers through the job's runtime_env (a worker node
# started by `ray start` elsewhere never sees the driver's environment).
WORKER_ENV = {
    # Tune's per-trial CSV/JSON/TensorBoard loggers cost I/O per trial and duplicate what
    # the Parquet store holds; our own progress line replaces Tune's table.
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
    "RAY_CHDIR_TO_TRIAL_DIR": "0",
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "1000",
    "RAY_DEDUP_LOGS": "0",
    "RAY_AIR_NEW_OUTPUT": "0",
    "TUNE_RESULT_BUFFER_LENGTH": "1",
}


WORKER_RUNTIME_ENV = {"env_vars": dict(WORKER_ENV)}


def _quiet_ray_env() -> None:
    for k, v in WORKER_ENV.items():
        os.environ.setdefault(k, v)


# Before Ray is imported: some of these are read at import time.
_quiet_ray_env()

import ray  # noqa: E402
import ray.exceptions  # noqa: E402
from ray import tune  # noqa: E402
from ray.tune.search import Searcher  # noqa: E402
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: E402

from sweep import Cell  # noqa: E402

from .errors import ClusterError  # noqa: E402
from .options import TrialOptions  # noqa: E402
from .rows import cell_row, failed_result, now  # noqa: E402
from .store import Store, StoreError  # noqa: E402

Land = Callable[[dict, list[dict]], None]


def run_local(pending: list[Cell], opts: TrialOptions, land: Land, progress, run_opts=None,
              store: Store | None = None) -> None:
    """Debugging/test executor: the same trial function, in this process, in order; the
    checkpoints and weights go straight into the results folder (this is the driver)."""
    from .train import run_cell

    files = Store(opts.results_dir)
    for c in pending:
        progress.running = 1
        progress.tick()
        row, epochs = run_cell(c.to_dict(), opts, report=lambda m: progress.tick(), files=files)
        progress.running = 0
        land(row, epochs)


# -- Ray: connecting and checking the cluster -----------------------------------------------
_STARTED_HERE = False  # this process called ray.init (connected to a cluster, or started one)
_OWN_LOCAL_RAY = False  # ... and that Ray is the one-node instance it started on this machine


def ensure_ray(address: str | None, num_cpus: int | None = None) -> bool:
    """Connect to `address`, or start a fresh local Ray in this process; True if we started it.

    Without an address we always start our own instance ("local"): never attach by surprise
    to some other Ray running on this machine (RAY_ADDRESS, /tmp/ray/ray_current_cluster).
    """
    global _OWN_LOCAL_RAY
    if ray.is_initialized():
        return False
    kwargs = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
                  configure_logging=True)
    if address:
        # Other nodes' workers do not inherit this process's environment: the job's
        # runtime_env carries it to them.
        _join(address, kwargs)
    else:
        # The Ray started here inherits this process's environment (WORKER_ENV is set above),
        # so no runtime_env: with one, each trial actor's worker took ~0.9 s longer to start
        # (measured here: 1.2 s against 0.36 s from request to a first actor's reply).
        # Ray runs its workers at nice 15 by default: the training would then yield its core
        # to anything else on the machine (the driver's Tune loop, a compiler, a browser) and
        # a cell trains measurably slower than the same loop in a plain process.
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(),
                 _system_config={"worker_niceness": 0}, **kwargs)
    _OWN_LOCAL_RAY = not address
    return True


def _join(address: str, kwargs: dict) -> None:
    """ray.init at a cluster; a refusal (no token, a wrong one, nobody there) becomes one line.
    Ray's C++ client logs its own retries on fd 2 while it tries (~20 s): held back, and
    passed on only when the connection succeeds."""
    refused = None
    held = tempfile.TemporaryFile()
    saved = os.dup(2)
    os.dup2(held.fileno(), 2)
    try:
        ray.init(address=address, runtime_env=WORKER_RUNTIME_ENV, **kwargs)
    except (ConnectionError, ray.exceptions.AuthenticationError) as e:
        refused = e
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        if refused is None:
            held.seek(0)
            os.write(2, held.read())
        held.close()
    if refused is not None:
        raise ClusterError(_refusal(address, refused)) from None


_TOKEN_HOWTO = ("set RAY_AUTH_MODE=token and give this driver the token its nodes use: "
                "RAY_AUTH_TOKEN_PATH=FILE (or RAY_AUTH_TOKEN, or ~/.ray/auth_token); see "
                "README, Running on a cluster")


def _refusal(address: str, e: Exception) -> str:
    if isinstance(e, ray.exceptions.AuthenticationError):
        return f"cannot join the Ray cluster at {address}: this driver has no token; {_TOKEN_HOWTO}"
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
    except (OSError, ValueError):
        return (f"cannot reach a Ray cluster at {address}: nothing answers there; check "
                "--address (HEAD_IP:PORT of `ray start --head`) and that the head is running")
    return (f"the Ray cluster at {address} refused this driver (token authentication: no "
            f"token, or not the cluster's); {_TOKEN_HOWTO}")


def shutdown_if_started() -> None:
    global _STARTED_HERE, _OWN_LOCAL_RAY
    if _STARTED_HERE and ray.is_initialized():
        ray.shutdown()
    _STARTED_HERE = _OWN_LOCAL_RAY = False


def _fmt(x: float) -> str:
    return f"{x:g}"


def _alive_nodes() -> list[dict]:
    return [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]


def trial_slots(cpus: float, gpus: float) -> int:
    """How many trials of this size fit on the cluster at once (summed over nodes)."""
    total = 0
    for res in _alive_nodes():
        fits = []
        if cpus > 0:
            fits.append(res.get("CPU", 0) / cpus)
        if gpus > 0:
            fits.append(res.get("GPU", 0) / gpus)
        total += int(math.floor(min(fits) + 1e-9)) if fits else 1
    return total


def check_resources(cpus: float, gpus: float) -> None:
    """Refuse, before anything starts, a trial size no node of the cluster can hold (Tune
    would wait for it forever)."""
    have = ray.cluster_resources()
    nodes = _alive_nodes()
    what = (f"the cluster has {_fmt(have.get('CPU', 0))} CPUs and {_fmt(have.get('GPU', 0))} "
            f"GPUs on {len(nodes)} node{'s' if len(nodes) != 1 else ''}")
    if cpus < 0 or gpus < 0:
        raise ClusterError(f"--cpus-per-trial and --gpus-per-trial cannot be negative; {what}")
    if gpus > 0 and not have.get("GPU"):
        raise ClusterError(f"--gpus-per-trial {_fmt(gpus)} asks for GPUs but {what}; drop "
                           "--gpus-per-trial or connect to a cluster with GPU nodes (--address)")
    if any(res.get("CPU", 0) >= cpus and res.get("GPU", 0) >= gpus for res in nodes):
        return
    big_cpu = max((res.get("CPU", 0) for res in nodes), default=0)
    big_gpu = max((res.get("GPU", 0) for res in nodes), default=0)
    raise ClusterError(f"no node can hold a trial of {_fmt(cpus)} CPUs and {_fmt(gpus)} GPUs: "
                       f"{what}, at most {_fmt(big_cpu)} CPUs and {_fmt(big_gpu)} GPUs on one "
                       "node; lower --cpus-per-trial / --gpus-per-trial")


def connect(run_opts) -> None:
    """Start or join Ray and check the trial size against it; on a refusal leave Ray as found.
    A Ray started here is shut down at the end of run_ray."""
    global _STARTED_HERE
    started = ensure_ray(run_opts.address)
    _STARTED_HERE = _STARTED_HERE or started
    try:
        check_resources(run_opts.cpus_per_trial, run_opts.gpus_per_trial)
    except ClusterError:
        if started:
            shutdown_if_started()
        raise


# -- Ray: the driver's files, from any node -------------------------------------------------
class DriverFiles:
    """An actor on the driver's node that writes and reads the cells' checkpoints and final
    weights in the driver's results folder (Store's atomic byte helpers): the driver's machine
    holds the whole study, and no worker needs (or creates) the folder."""

    def __init__(self, results_dir: str):
        self.store = Store(results_dir)

    def save_checkpoint(self, cell_id: str, data: bytes) -> bool:
        return self.store.save_checkpoint(cell_id, data)

    def load_checkpoint(self, cell_id: str, mark_in_flight: bool = False) -> bytes | None:
        return self.store.load_checkpoint(cell_id, mark_in_flight)

    def save_weights(self, cell_id: str, data: bytes) -> str | None:
        return self.store.save_weights(cell_id, data)

    def quarantine_checkpoint(self, cell_id: str, reason: str, mark_in_flight: bool = False) -> None:
        self.store.quarantine_checkpoint(cell_id, reason, mark_in_flight)


class _RemoteFiles:
    """train.CellFiles over the actor: each call waits for the write, so a checkpoint is on
    the driver's disk before the trial goes on (and before its row can land)."""

    def __init__(self, handle):
        self.handle = handle

    def save_checkpoint(self, cell_id: str, data: bytes) -> bool:
        return ray.get(self.handle.save_checkpoint.remote(cell_id, data))

    def load_checkpoint(self, cell_id: str, mark_in_flight: bool = False) -> bytes | None:
        return ray.get(self.handle.load_checkpoint.remote(cell_id, mark_in_flight))

    def save_weights(self, cell_id: str, data: bytes) -> str | None:
        return ray.get(self.handle.save_weights.remote(cell_id, data))

    def quarantine_checkpoint(self, cell_id: str, reason: str, mark_in_flight: bool = False) -> None:
        ray.get(self.handle.quarantine_checkpoint.remote(cell_id, reason, mark_in_flight))


def _driver_node_id() -> str:
    """The node on the driver's machine. Where several Ray nodes share the driver's address
    (nodes started side by side on one machine), the head node: the driver may have attached
    to any of them, and a worker node is the one a test (or an operator) may take away."""
    me = ray.get_runtime_context().get_node_id()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    ip = next((n["NodeManagerAddress"] for n in nodes if n["NodeID"] == me), None)
    heads = [n["NodeID"] for n in nodes if n["NodeManagerAddress"] == ip
             and "node:__internal_head__" in n.get("Resources", {})]
    return heads[0] if heads else me


def start_driver_files(results_dir: str):
    node_id = _driver_node_id()
    actor = ray.remote(DriverFiles).options(
        num_cpus=0, max_restarts=-1, max_task_retries=-1,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
    ).remote(results_dir)
    return actor


# -- Ray Tune -------------------------------------------------------------------------------
class CellSearcher(Searcher):
    """Hands Tune one index into the cell table at a time: constant work per trial, where a
    `tune.grid_search` over the cell dicts is deep-copied for every variant (quadratic)."""

    def __init__(self, indices: list[int]):
        super().__init__()
        self.indices, self.next = indices, 0

    def suggest(self, trial_id: str):
        if self.next >= len(self.indices):
            return Searcher.FINISHED
        self.next += 1
        return {"i": self.indices[self.next - 1]}

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
        pass

    # Tune's own experiment restore is not used: the store is the record of the study.
    def save(self, checkpoint_path: str) -> None:
        pass

    def restore(self, checkpoint_path: str) -> None:
        pass


_TS_FIELDS = ("started_at", "finished_at")
_ROW_KEYS = ("row_json", "epochs_json")


def _encode(row: dict, epochs: list[dict]) -> dict:
    row = {k: (v.isoformat() if k in _TS_FIELDS and v is not None else v) for k, v in row.items()}
    return {"row_json": json.dumps(row), "epochs_json": json.dumps(epochs)}


def _decode(result: dict) -> tuple[dict, list[dict]]:
    row = json.loads(result["row_json"])
    for k in _TS_FIELDS:
        if row.get(k):
            row[k] = dt.datetime.fromisoformat(row[k])
    return row, json.loads(result["epochs_json"])


HEARTBEAT_S = 10.0
_WORKER_CACHE: dict[str, object] = {}


def _cached(ref):
    """ray.get once per worker process: a reused actor fetches the table and data once."""
    key = ref.hex()
    if key not in _WORKER_CACHE:
        _WORKER_CACHE[key] = ray.get(ref)
    return _WORKER_CACHE[key]


def _unnice() -> None:
    """Train at normal priority on nodes started without RAY_worker_niceness=0 (Ray runs its
    workers at nice 15): where the process may raise its priority (root, CAP_SYS_NICE), this
    training thread takes back its share of the CPU; elsewhere it stays as Ray set it."""
    try:
        if os.getpriority(os.PRIO_PROCESS, 0) > 0:
            os.setpriority(os.PRIO_PROCESS, 0, 0)  # on Linux: the calling thread
    except OSError:
        pass


def _trial_files(handle, opts: TrialOptions):
    """Where a trial reads and writes its checkpoints and weights: through the driver's
    actor on a cluster; straight into the results folder on the Ray this driver started on
    its own machine (one node: the trial runs where the folder is; no actor round trips)."""
    return _RemoteFiles(handle) if handle is not None else Store(opts.results_dir)


def tune_trial(config: dict, shared: dict) -> None:
    """The Ray Tune function trainable: cell number config["i"] of the shipped table."""
    from .train import run_cell

    _unnice()
    cell = _cached(shared["cells"])[config["i"]]
    opts = TrialOptions(**shared["opts"])
    raw = _cached(shared["data"][cell["config"]["dataset"]]) \
        if cell["config"]["dataset"] in shared["data"] else None
    node_id = ray.get_runtime_context().get_node_id()
    last = [time.monotonic()]

    def heartbeat(metrics: dict) -> None:
        # Each tune.report waits for the driver to take it: a report per epoch would cost a
        # driver round trip per epoch. The epoch rows travel with the final row; this only
        # keeps the progress line (and the driver lock's heartbeat) alive during long cells.
        if time.monotonic() - last[0] >= HEARTBEAT_S:
            last[0] = time.monotonic()
            tune.report(metrics)

    row, epochs = run_cell(cell, opts, report=heartbeat, node_id=node_id,
                           files=_trial_files(shared["files"], opts), raw=raw)
    tune.report({"final": 1, **_encode(row, epochs)})


class StoreCallback(tune.Callback):
    """Lands each finished cell in the store from the driver, as it finishes."""

    def __init__(self, land: Land, progress, opts: TrialOptions, max_failures: int,
                 cells: list[dict]):
        self.land, self.progress, self.opts, self.max_failures = land, progress, opts, max_failures
        self.cells = cells
        self.started: dict[str, object] = {}  # trial_id -> when it started (a failed row's)
        self.requeue: list[int] = []  # cells Tune gave up on before max_failures (see below)
        self.may_requeue = False

    def __getstate__(self):
        # Tune pickles its callbacks with the experiment; ours hold the live driver
        # (streams, the store) and are never restored from Tune's state: our store is.
        return {}

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started.setdefault(trial.trial_id, now())  # a restart keeps the first
        self.progress.running += 1
        self.progress.tick()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "row_json" in result:
            self.land(*_decode(result))
            # Tune keeps each trial's last result for the whole run (and in its snapshots):
            # once landed, the row must not stay there (Tune lets callbacks edit it).
            for k in _ROW_KEYS:
                result.pop(k, None)
        self.progress.tick()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.started.pop(trial.trial_id, None)
        self.progress.running = max(0, self.progress.running - 1)

    def on_trial_error(self, iteration, trials, trial, **info):
        # Ray gave up on the trial (its worker died more than max_failures times):
        # record it as failed so the study goes on; --retry-failed runs it again.
        self.progress.running = max(0, self.progress.running - 1)
        # Tune retries a RUNNING trial up to max_failures times, but errs a PENDING one at
        # once when the reused actor it was handed died with its node: such a cell goes
        # into the next pass instead of failing for a loss that was not its own.
        if self.may_requeue and trial.run_metadata.num_failures <= self.max_failures:
            self.requeue.append(trial.config["i"])
            self.started.pop(trial.trial_id, None)
            return
        cell = self.cells[trial.config["i"]]
        err = getattr(trial, "error_message", None) or "Ray trial failed (worker lost)"
        lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
        row = cell_row(cell, failed_result(lines[-1] if lines else "Ray trial failed"),
                       study=self.opts.study, attempts=self.max_failures + 1,
                       started_at=self.started.pop(trial.trial_id, None),
                       host=_hostname(getattr(trial, "node_ip", None)), node_id=None)
        self.land(row, [])


def _hostname(ip: str | None) -> str | None:
    """The name of the machine at a node address Ray reported (what a worker's row holds)."""
    if not ip:
        return None
    names = [n.get("NodeManagerHostname") for n in ray.nodes() if n.get("NodeManagerAddress") == ip]
    return next((h for h in names if h), ip)


def _ship_datasets(cells: list[dict], opts: TrialOptions) -> dict:
    """Each dataset the cells need, read once here (uint8) and put in the object store."""
    from . import data as datasets

    refs = {}
    for name in sorted({c["config"]["dataset"] for c in cells}):
        refs[name] = ray.put(datasets.load_raw(name, opts.data_dir))
    return refs


def _trainable(shared: dict, run_opts):
    """tune_trial with the shipped table and data, at the trial size asked for."""
    slots = max(1, trial_slots(run_opts.cpus_per_trial, run_opts.gpus_per_trial))
    # A custom searcher gets one pending trial at a time by default: let as many wait as can
    # run, so the cluster fills at once.
    os.environ["TUNE_MAX_PENDING_TRIALS_PG"] = str(max(2, 2 * slots))
    resources = {"cpu": run_opts.cpus_per_trial, "gpu": run_opts.gpus_per_trial}
    return tune.with_resources(tune.with_parameters(tune_trial, shared=shared), resources)


def _fit_in_passes(trainable, callback: StoreCallback, n_cells: int, run_opts,
                   tune_dir: str) -> None:
    """All cells through Tune; then, in further passes (at most max_failures), the cells
    the callback requeued because Tune gave up on them before max_failures."""
    todo = list(range(n_cells))
    for n_pass in range(run_opts.max_failures + 1):
        callback.may_requeue = n_pass < run_opts.max_failures
        tune.Tuner(
            trainable,
            param_space={},
            tune_config=tune.TuneConfig(
                search_alg=CellSearcher(todo), num_samples=len(todo),
                reuse_actors=True,  # ~40 ms per trial instead of ~1 s of actor start-up
                max_concurrent_trials=run_opts.max_concurrent,
            ),
            run_config=tune.RunConfig(
                name=f"tune-{n_pass}", storage_path=tune_dir,
                failure_config=tune.FailureConfig(max_failures=run_opts.max_failures),
                callbacks=[callback], verbose=0, log_to_file=False,
            ),
        ).fit()
        todo, callback.requeue = callback.requeue, []
        if not todo:
            return


def run_ray(pending: list[Cell], opts: TrialOptions, land: Land, progress, run_opts, store) -> None:
    global _STARTED_HERE
    _STARTED_HERE = ensure_ray(run_opts.address) or _STARTED_HERE
    # Tune's end-of-run summary looks for the per-trial files we switched off above.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    store_errors: list[StoreError] = []

    def land_or_stop(row: dict, epochs: list[dict]) -> None:
        # A row that cannot be written (disk full, folder gone) must stop the study: going
        # on would train cells whose results are thrown away.
        try:
            land(row, epochs)
        except StoreError as e:
            store_errors.append(e)
            raise

    cells = [c.to_dict() for c in pending]
    callback = StoreCallback(land_or_stop, progress, opts, run_opts.max_failures, cells)
    # A Ray started here has one node, this machine: trials reach the results folder
    # directly. Joined to a cluster (--address), no node but the driver's may assume it.
    files = None if _OWN_LOCAL_RAY else start_driver_files(opts.results_dir)
    shared = {"cells": ray.put(cells), "data": _ship_datasets(cells, opts), "files": files,
              "opts": opts.to_dict()}
    trainable = _trainable(shared, run_opts)
    # Tune's own bookkeeping stays on the driver's machine, outside the results folder.
    tune_dir = tempfile.mkdtemp(prefix="study-tune-")
    try:
        _fit_in_passes(trainable, callback, len(cells), run_opts, tune_dir)
    except Exception:
        if store_errors:
            raise store_errors[0] from None
        raise
    finally:
        if files is not None:
            ray.kill(files)
        shutdown_if_started()
        # Tune's own bookkeeping: our store is the record of the study.
        shutil.rmtree(tune_dir, ignore_errors=True)
