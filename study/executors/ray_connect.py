"""Ray for the executor: started here (one node, this machine) or joined (--address), the
trial size checked against the cluster before anything starts, and shut down at the end.

WORKER_ENV is set here before Ray is imported (some of it is read at import time): every
module of this package that imports Ray imports this one first.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import tempfile

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

from ..errors import ClusterError  # noqa: E402

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
        with _without_own_token_note():
            ray.init(address="local", num_cpus=num_cpus or os.cpu_count(),
                     _system_config={"worker_niceness": 0}, **kwargs)
    _OWN_LOCAL_RAY = not address
    return True


class _OwnRayTokenNote(logging.Filter):
    """Ray 2.60 turns token authentication on for a local ray.init (RAY_AUTH_MODE unset) and
    says so in a warning on every run. For the Ray the tool starts itself, on this machine,
    that warning would be the first line a newcomer reads: authentication stays on, the note
    goes. A cluster joined with --address keeps all of Ray's warnings."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled")


@contextlib.contextmanager
def _without_own_token_note():
    # Setting RAY_AUTH_MODE=token ourselves would also silence it, but Ray caches its
    # config at import (before we could set it) and the GCS then refused the driver.
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    note = _OwnRayTokenNote()
    logger.addFilter(note)
    try:
        yield
    finally:
        logger.removeFilter(note)


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


def start_or_join(address: str | None) -> bool:
    """ensure_ray, remembering a Ray started here for shutdown_if_started (the end of
    run_ray); True if it started (or joined) one now."""
    global _STARTED_HERE
    started = ensure_ray(address)
    _STARTED_HERE = _STARTED_HERE or started
    return started


def own_local_ray() -> bool:
    """The Ray this process runs on is the one-node instance it started on this machine."""
    return _OWN_LOCAL_RAY


def connect(run_opts) -> None:
    """Start or join Ray and check the trial size against it; on a refusal leave Ray as found.
    A Ray started here is shut down at the end of run_ray."""
    started = start_or_join(run_opts.address)
    try:
        check_resources(run_opts.cpus_per_trial, run_opts.gpus_per_trial)
    except ClusterError:
        if started:
            shutdown_if_started()
        raise

