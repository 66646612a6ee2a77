"""The Ray executor: the pending cells as Ray Tune trials.

The driver ships the table of units (one cell, or a fused group of cells) and the datasets
through Ray's object store once; each trial (tune_trial) trains one unit, or a bundle of
small ones one after another (study.bundles), with fused.train.run_group (train.run_cell for
a unit of one) and reports their rows back, which StoreCallback lands in the store from the
driver as they finish. Cells Tune gave up on too early run again in further passes
(_fit_in_passes). Workers need this package and torch, nothing else. No torch is imported
here (the driver never trains); the trial function imports it on the worker.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time

from . import ray_connect  # first: WORKER_ENV is set before Ray is imported

import ray  # noqa: E402
from ray import tune  # noqa: E402
from ray.tune.search import Searcher  # noqa: E402

from sweep import Cell  # noqa: E402
from sweep.fusion import group_id  # noqa: E402

from .. import interrupt  # noqa: E402
from ..bundles import plan_bundles  # noqa: E402
from ..executor_registry import Land  # noqa: E402
from ..options import TrialOptions  # noqa: E402
from ..rows import cell_row, failed_result, now  # noqa: E402
from ..store import StoreError  # noqa: E402
from . import codec  # noqa: E402
from .ray_files import on_driver_node, start_driver_files, trial_files  # noqa: E402


class CellSearcher(Searcher):
    """Hands Tune one trial's units at a time (a bundle of indices into the unit table):
    constant work per trial, where a `tune.grid_search` over the cell dicts is deep-copied
    for every variant (quadratic)."""

    def __init__(self, bundles: list[list[int]]):
        super().__init__()
        self.bundles, self.next = bundles, 0

    def suggest(self, trial_id: str):
        if self.next >= len(self.bundles) or interrupt.requested():
            return Searcher.FINISHED
        self.next += 1
        return {"units": self.bundles[self.next - 1]}

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
        pass

    # Tune's own experiment restore is not used: the store is the record of the study.
    def save(self, checkpoint_path: str) -> None:
        pass

    def restore(self, checkpoint_path: str) -> None:
        pass


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


def tune_trial(config: dict, shared: dict) -> None:
    """The Ray Tune function trainable: the units config["units"] of the shipped table (a
    bundle, study.bundles), one after another."""
    from ..fused.train import run_group

    _unnice()
    table = _cached(shared["units"])
    opts = shared["opts"]  # the run's TrialOptions, as the driver resolved them
    node_id = ray.get_runtime_context().get_node_id()
    files = trial_files(shared["files"], opts.results_dir)
    if shared.get("barrier") is not None:
        _wait_at_barrier(shared["barrier"])
    last = [time.monotonic()]

    def heartbeat(metrics: dict) -> None:
        # Each tune.report waits for the driver to take it: a report per epoch would cost a
        # driver round trip per epoch. The epoch rows travel with the final row; this only
        # keeps the progress line (and the driver lock's heartbeat) alive during long cells.
        if time.monotonic() - last[0] >= HEARTBEAT_S:
            last[0] = time.monotonic()
            tune.report(metrics)

    finished: list = []  # (row, epochs) of finished cells not yet sent to the driver
    with interrupt.checking(_stop_check(shared["stop"])):
        for n, i in enumerate(config["units"]):
            if n and interrupt.should_stop():
                break  # the bundle's other units have not begun: they stay pending
            unit = table[i]
            dataset = unit[0]["config"]["dataset"]  # a group shares its dataset
            raw = _cached(shared["data"][dataset]) if dataset in shared["data"] else None
            finished += run_group(unit, opts, report=heartbeat, node_id=node_id, files=files,
                                  raw=raw)
            # A bundle's small cells go to the driver together, at most ROWS_EVERY_S apart
            # (a driver round trip each would cost what bundling saves): a worker lost in
            # between costs those cells' training again, a few seconds at most.
            if n + 1 < len(config["units"]) and time.monotonic() - last[0] >= ROWS_EVERY_S:
                last[0] = time.monotonic()
                tune.report(codec.encode_all(finished))
                finished = []
    tune.report(codec.encode_all(finished))


ROWS_EVERY_S = 2.0


@ray.remote(num_cpus=0)
class StopFlag:
    """Set by the driver on a stop signal (study.interrupt); trials ask it between epochs."""

    def __init__(self):
        self.set_ = False

    def set(self) -> None:
        self.set_ = True

    def is_set(self) -> bool:
        return self.set_


STOP_POLL_S = 1.0  # a trial asks at most this often: ~1 ms a question, epochs may be ~ms


def _stop_check(flag):
    """The trial's question to the driver's StopFlag, asked at most every STOP_POLL_S."""
    # first asked STOP_POLL_S into the trial: a stop asked before it started reached the
    # searcher, and a short cell costs the flag's actor nothing
    last, answer = [time.monotonic()], [False]

    def check() -> bool:
        if not answer[0] and time.monotonic() - last[0] >= STOP_POLL_S:
            last[0] = time.monotonic()
            try:
                answer[0] = ray.get(flag.is_set.remote())
            except ray.exceptions.RayActorError:
                # The flag lives on the driver's node: unreachable, the driver is going or
                # gone, and Tune ends this trial; the cell itself did nothing wrong.
                pass
        return answer[0]
    return check


@ray.remote(num_cpus=0)
class TrialBarrier:
    """Test hook (STUDY_TRIAL_BARRIER=N): the first N trials wait here until all N run at
    once (or BARRIER_TIMEOUT_S passes), so a test of how Ray packs trials depends on no
    trial's speed or start-up time."""

    def __init__(self, n: int):
        self.n, self.arrived = n, 0

    def arrive(self) -> bool:
        """True for the first n trials: they wait for the others."""
        self.arrived += 1
        return self.arrived <= self.n

    def complete(self) -> bool:
        return self.arrived >= self.n


BARRIER_TIMEOUT_S = 120.0


def _wait_at_barrier(barrier) -> None:
    if not ray.get(barrier.arrive.remote()):
        return
    t0 = time.monotonic()
    while time.monotonic() - t0 < BARRIER_TIMEOUT_S and not ray.get(barrier.complete.remote()):
        time.sleep(0.2)


class StoreCallback(tune.Callback):
    """Lands each finished cell in the store from the driver, as its unit finishes."""

    def __init__(self, land: Land, progress, opts: TrialOptions, max_failures: int,
                 units: list[list[dict]], stop_flag=None):
        self.land, self.progress, self.opts, self.max_failures = land, progress, opts, max_failures
        self.units, self.stop_flag, self.stop_sent = units, stop_flag, False
        self.started: dict[str, object] = {}  # trial_id -> when it started (a failed row's)
        self.requeue: list[list[int]] = []  # trials Tune gave up on early (see below)
        self.may_requeue = False
        # cells landed by this run: a bundle Tune restarts after its worker died trains its
        # units again, and those that had landed are not landed twice
        self.landed: set[str] = set()

    def _width(self, trial) -> int:
        """Cells a trial trains at once: its largest unit (a bundle's run one by one)."""
        return max(len(self.units[i]) for i in trial.config["units"])

    def __getstate__(self):
        # Tune pickles its callbacks with the experiment; ours hold the live driver
        # (streams, the store) and are never restored from Tune's state: our store is.
        return {}

    def setup(self, **info):
        # Each Tune run installs its own SIGUSR1 handler after the driver's ("stop the run":
        # trials end without their checkpoint and the driver sees a finished run, exit 0).
        # Tune calls this after that, before any trial: the driver's handler goes back.
        interrupt.reclaim_signals()

    def on_step_begin(self, iteration, trials, **info):
        # The signal handler only sets a flag: Ray is called from Tune's loop, not from it.
        if interrupt.requested() and not self.stop_sent and self.stop_flag is not None:
            self.stop_flag.set.remote()
            self.stop_sent = True

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started.setdefault(trial.trial_id, now())  # a restart keeps the first
        self.progress.running += self._width(trial)
        self.progress.trials += 1
        self.progress.tick()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if codec.ROW_KEYS[0] in result:
            for row, epochs in codec.decode_all(result):
                if row["cell_id"] not in self.landed:
                    self.landed.add(row["cell_id"])
                    self.land(row, epochs)
            # Tune keeps each trial's last result for the whole run (and in its snapshots):
            # once landed, the row must not stay there (Tune lets callbacks edit it).
            for k in codec.ROW_KEYS:
                result.pop(k, None)
        self.progress.tick()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.started.pop(trial.trial_id, None)
        self.progress.running = max(0, self.progress.running - self._width(trial))
        self.progress.trials = max(0, self.progress.trials - 1)

    def on_trial_error(self, iteration, trials, trial, **info):
        # Ray gave up on the trial (its worker died more than max_failures times):
        # record it as failed so the study goes on; --retry-failed runs it again.
        self.progress.running = max(0, self.progress.running - self._width(trial))
        self.progress.trials = max(0, self.progress.trials - 1)
        left = [i for i in trial.config["units"]
                if any(c["cell_id"] not in self.landed for c in self.units[i])]
        # Tune retries a RUNNING trial up to max_failures times, but errs a PENDING one at
        # once when the reused actor it was handed died with its node: such a cell goes
        # into the next pass instead of failing for a loss that was not its own. A bundle's
        # units that had not landed go into the next pass one per trial, where the loss of a
        # worker is charged to the one unit it trained.
        if len(left) > 1:
            self.requeue += [[i] for i in left]
            self.started.pop(trial.trial_id, None)
            return
        if self.may_requeue and trial.run_metadata.num_failures <= self.max_failures:
            self.requeue += [left] if left else []
            self.started.pop(trial.trial_id, None)
            return
        lines = [ln for ln in _error_text(trial).strip().splitlines() if ln.strip()]
        started = self.started.pop(trial.trial_id, None)
        host = _hostname(getattr(trial, "node_ip", None))
        for unit in (self.units[i] for i in left):
            group = {"group_size": len(unit), "fused_group":
                     group_id(c["cell_id"] for c in unit) if len(unit) > 1 else None}
            for cell in unit:
                row = cell_row(cell, {**failed_result(lines[-1] if lines else "Ray trial failed"),
                                      **group},
                               study=self.opts.study, attempts=self.max_failures + 1,
                               started_at=started, host=host, node_id=None)
                self.landed.add(cell["cell_id"])
                self.land(row, [])


def _error_text(trial) -> str:
    """The error Tune recorded for a trial it gave up on (its files on the driver)."""
    try:
        err = trial.get_pickled_error() or trial.get_error()
    except Exception:  # an error that does not unpickle here: the row still says failed
        err = None
    return str(err) if err else "Ray trial failed (worker lost)"


def _hostname(ip: str | None) -> str | None:
    """The name of the machine at a node address Ray reported (what a worker's row holds)."""
    if not ip:
        return None
    names = [n.get("NodeManagerHostname") for n in ray.nodes() if n.get("NodeManagerAddress") == ip]
    return next((h for h in names if h), ip)


def _ship_datasets(units: list[list[dict]], opts: TrialOptions) -> dict:
    """Each dataset the cells need, read once here (uint8) and put in the object store."""
    from .. import data as datasets

    refs = {}
    for name in sorted({c["config"]["dataset"] for unit in units for c in unit}):
        refs[name] = ray.put(datasets.load_raw(name, opts.data_dir))
    return refs


def _trainable(shared: dict, run_opts, slots: int):
    """tune_trial with the shipped table and data, at the trial size asked for."""
    # A custom searcher gets one pending trial at a time by default: let as many wait as can
    # run, so the cluster fills at once.
    os.environ["TUNE_MAX_PENDING_TRIALS_PG"] = str(max(2, 2 * slots))
    resources = {"cpu": run_opts.cpus_per_trial, "gpu": run_opts.gpus_per_trial}
    return tune.with_resources(tune.with_parameters(tune_trial, shared=shared), resources)


# Trials per Tuner.fit. Tune's controller scans every trial of its fit on each step (the
# FIFO scheduler's choose_trial_to_run walks the finished ones to find a pending one; the
# experiment snapshot pickles them all), so one fit over N trials costs the driver O(N^2):
# the units go through Tune in fits of at most this many. Each fit starts its trial actors
# afresh (~1 s each; actors are reused within a fit only) and leaves slots idle while its
# last trials finish. 1,000 is a first bound, not yet sized by measurement: a study of fewer
# units runs in one fit, as before.
TRIALS_PER_FIT = 1000
# ... and at least this many per slot of the cluster, so that a fit's tail (and its actors'
# start-up) stays small against its body on a large cluster.
TRIALS_PER_SLOT = 50


def _chunks(todo: list, slots: int) -> list[list]:
    """`todo` in consecutive fits of about equal size, none over the cap."""
    cap = max(TRIALS_PER_FIT, TRIALS_PER_SLOT * slots)
    n = max(1, -(-len(todo) // cap))
    size = -(-len(todo) // n)
    return [todo[i:i + size] for i in range(0, len(todo), size)]


def _fit_in_passes(trainable, callback: StoreCallback, bundles: list[list[int]], run_opts,
                   tune_dir: str, slots: int = 1) -> None:
    """All bundles (each a trial's unit indices) through Tune, in fits of at most
    TRIALS_PER_FIT trials (_chunks); then, in further passes, the units the callback
    requeued: those of trials Tune gave up on before max_failures (at most max_failures
    passes of those), and a failed bundle's units, one per trial (one more pass)."""
    todo = bundles
    max_failures = run_opts.trial.max_failures
    for n_pass in range(max_failures + 2):
        callback.may_requeue = n_pass < max_failures
        for n_fit, chunk in enumerate(_chunks(todo, slots)):
            if interrupt.requested():
                return
            tune.Tuner(
                trainable,
                param_space={},
                tune_config=tune.TuneConfig(
                    search_alg=CellSearcher(chunk), num_samples=len(chunk),
                    reuse_actors=True,  # ~40 ms per trial instead of ~1 s of actor start-up
                    max_concurrent_trials=run_opts.max_concurrent,
                ),
                run_config=tune.RunConfig(
                    name=f"tune-{n_pass}-{n_fit}", storage_path=tune_dir,
                    failure_config=tune.FailureConfig(max_failures=max_failures),
                    callbacks=[callback], verbose=0, log_to_file=False,
                ),
            ).fit()
        todo, callback.requeue = callback.requeue, []
        if not todo or interrupt.requested():
            return


def run_ray(units: list[list[Cell]], run_opts, land: Land, progress, store) -> None:
    """Every unit (a cell, or a fused group) as a Tune trial of `run_opts`' size, trained
    with `run_opts.trial`."""
    ray_connect.start_or_join(run_opts.address)
    interrupt.reclaim_signals()
    opts = run_opts.trial
    # Tune's end-of-run summary looks for the per-trial files ray_connect.WORKER_ENV switched off.
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

    table = [[c.to_dict() for c in unit] for unit in units]
    driver_node = on_driver_node()  # one query of Ray's nodes for the three actors
    stop_flag = StopFlag.options(scheduling_strategy=driver_node).remote()
    callback = StoreCallback(land_or_stop, progress, opts, opts.max_failures, table, stop_flag)
    # A Ray started here has one node, this machine: trials reach the results folder
    # directly. Joined to a cluster (--address), no node but the driver's may assume it.
    files = (None if ray_connect.own_local_ray()
             else start_driver_files(opts.results_dir, driver_node))
    # The options travel as they are: a dataclass pickles through the object store.
    barrier = os.environ.get("STUDY_TRIAL_BARRIER")
    shared = {"units": ray.put(table), "data": _ship_datasets(table, opts), "files": files,
              "opts": opts, "stop": stop_flag,
              "barrier": (TrialBarrier.options(scheduling_strategy=driver_node)
                          .remote(int(barrier)) if barrier else None)}
    slots = max(1, ray_connect.trial_slots(run_opts.cpus_per_trial, run_opts.gpus_per_trial))
    if run_opts.max_concurrent:  # trials that may run at once
        slots = min(slots, run_opts.max_concurrent)
    trainable = _trainable(shared, run_opts, slots)
    trials = plan_bundles([[c["config"] for c in unit] for unit in table], run_opts.bundle, slots)
    # Tune's own bookkeeping stays on the driver's machine, outside the results folder.
    tune_dir = tempfile.mkdtemp(prefix="study-tune-")
    try:
        _fit_in_passes(trainable, callback, trials, run_opts, tune_dir, slots)
    except Exception:
        if store_errors:
            raise store_errors[0] from None
        raise
    finally:
        for actor in (files, stop_flag, shared["barrier"]):
            if actor is not None:
                ray.kill(actor)
        ray_connect.shutdown_if_started()
        # Tune's own bookkeeping: our store is the record of the study.
        shutil.rmtree(tune_dir, ignore_errors=True)
