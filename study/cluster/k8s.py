"""`study k8s SPEC`: a KubeRay RayJob manifest that runs a study on Kubernetes.

One file for `kubectl apply -f`: a ConfigMap with the spec's TOML, a Secret with a Ray token
made for this study, a PersistentVolumeClaim for the results and the RayJob. The driver runs
on the head pod (which runs no cells: num-cpus 0) with the volume at /results; workers mount
no volume: rows, checkpoints and weights reach the driver through Ray, as on any cluster
(README, Running on a cluster). A second file holds a pod that mounts the volume once the job
is over, to copy the results out.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import os
import re
import secrets
import shlex
from pathlib import Path

from sweep import SpecError, load_spec
from sweep.spec import as_spec_error

from ..errors import ClusterError

RESULTS_MOUNT = "/results"
SPEC_MOUNT = "/spec"
TOKEN_DIR = "/etc/ray-token"
TOKEN_KEY = "token"
SPEC_KEY = "spec.toml"
DRIVER = ("python", "-u", "-m", "study.cli")
MANIFEST_FILE, FETCH_FILE = "rayjob.yaml", "fetch-results.yaml"
# KubeRay names the RayCluster, its pods and services after the RayJob; it refuses RayJob
# names longer than this.
MAX_JOB_NAME = 47
# The group of the image's user: files on the volume and the token file are made readable
# and writable for it (Ray's images run as uid 1000, gid 100; a root image reads them anyway).
DEFAULT_FS_GROUP = 100

_QUANTITY = re.compile(r"[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")
# Characters the entrypoint's words may not hold: it is parsed by a shell up to three times
# (KubeRay's submitter script, `ray job submit`'s re-quoting, Ray's shell=True), so nothing a
# double-quoted shell string would expand or end.
_UNSAFE = re.compile(r"[\"'$`\\\x00-\x1f\x7f]")

# `study run` options passed through to the driver, as (flag, type, help); given only when
# set, so the driver keeps `study run`'s own defaults.
PASSED_OPTIONS = (("--cpus-per-trial", float, "CPUs (and torch threads) per cell"),
                  ("--gpus-per-trial", float, "GPUs per cell (fractions share a GPU; "
                                              "default 1 when workers have GPUs, else 0)"),
                  ("--max-concurrent", int, "cap on cells running at once"),
                  ("--max-failures", int, "retries of a cell that raises (default 2)"),
                  ("--fuse", str, "K|auto|off, as for `study run` (default auto)"),
                  ("--bundle", str, "N|auto|off, as for `study run` (default auto)"),
                  ("--max-looks", int, "with --until-decided: stop after look N"),
                  ("--max-extra-cells", int, "with --until-decided: a budget of extra cells"),
                  ("--max-cells", int, "allow a grid of up to N cells"))
PASSED_FLAGS = (("--retry-failed", "run cells recorded as failed again"),
                ("--no-figures", "skip the figures and report drawn at the end"),
                ("--download", "download missing datasets into --data-dir (the head pod needs "
                               "the internet then)"),
                ("--until-decided", "run the spec's [design] looks until decided"))


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("k8s", help="write a KubeRay RayJob manifest that runs a spec on "
                                   "Kubernetes, and print the kubectl command")
    p.add_argument("spec", help="spec file or preset name")
    p.add_argument("--image", required=True,
                   help="container image with this package, torch and Ray >= 2.52 installed")
    p.add_argument("--namespace", metavar="NAME",
                   help="Kubernetes namespace (default: kubectl's current one)")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="worker pods (default 1)")
    p.add_argument("--gpus-per-worker", type=int, default=0, metavar="G",
                   help="GPUs (nvidia.com/gpu) per worker (default 0)")
    p.add_argument("--cpus-per-worker", type=float, default=4, metavar="C",
                   help="CPUs per worker (default 4)")
    p.add_argument("--memory-per-worker", default="16Gi", metavar="SIZE",
                   help="memory per worker (default 16Gi)")
    p.add_argument("--head-cpus", type=float, default=2, metavar="C",
                   help="CPUs of the head pod, which runs the driver only (default 2)")
    p.add_argument("--head-memory", default="8Gi", metavar="SIZE",
                   help="memory of the head pod (default 8Gi)")
    p.add_argument("--storage", default="10Gi", metavar="SIZE",
                   help="size of the results volume (default 10Gi)")
    p.add_argument("--storage-class", metavar="NAME",
                   help="StorageClass of the results volume (default: the cluster's default)")
    p.add_argument("--fs-group", type=int, default=DEFAULT_FS_GROUP, metavar="GID",
                   help=f"group id of the image's user (default {DEFAULT_FS_GROUP}, Ray's images)")
    p.add_argument("--backoff-limit", type=int, default=2, metavar="N",
                   help="times the job is retried on a new Ray cluster; a retry resumes the "
                        "study (default 2)")
    p.add_argument("--manifest-dir", metavar="DIR",
                   help="local folder for the manifests (default results/<study name>/k8s)")
    p.add_argument("--data-dir", default=f"{RESULTS_MOUNT}/data", metavar="DIR",
                   help="dataset folder inside the head pod (default /results/data, on the "
                        "results volume)")
    for flag, kind, helptext in PASSED_OPTIONS:
        p.add_argument(flag, type=kind, help=helptext,
                       metavar={int: "N", float: "X"}.get(kind, flag[2:].upper()))
    p.add_argument("--export", action="append", default=[], metavar="TRACKER[=WHERE]",
                   help="mlflow[=URI] or tensorboard[=LOGDIR], as for `study run` (repeatable)")
    for flag, helptext in PASSED_FLAGS:
        p.add_argument(flag, action="store_true", help=helptext)
    return p


def job_name(study_name: str) -> str:
    """The RayJob's name: `study-` and the study's name as a DNS label (lower case, '-' for
    anything else); a name changed or cut short gets a hash so two studies stay apart."""
    base = re.sub(r"-+", "-", re.sub(r"[^a-z0-9]", "-", study_name.lower())).strip("-")
    name = f"study-{base}".rstrip("-")
    if base != study_name or len(name) > MAX_JOB_NAME:
        digest = hashlib.sha256(study_name.encode()).hexdigest()[:6]
        name = f"{name[:MAX_JOB_NAME - 7].rstrip('-')}-{digest}"
    return name


def _passed_argv(args) -> list[str]:
    """The `study run` options as the driver gets them, in a fixed order."""
    argv = ["--address", "auto", "--data-dir", args.data_dir]
    for flag, _, _ in PASSED_OPTIONS:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            argv += [flag, format(value, "g") if isinstance(value, float) else str(value)]
    for target in args.export:
        argv += ["--export", target]
    argv += [flag for flag, _ in PASSED_FLAGS if getattr(args, flag[2:].replace("-", "_"))]
    return argv


def driver_commands(study_name: str, passed: list[str]) -> tuple[list[str], list[str]]:
    """The two commands the head may run: `study run` the first time, `study resume` when the
    volume already holds the study (a retried job)."""
    results = f"{RESULTS_MOUNT}/{study_name}"
    run = [*DRIVER, "run", f"{SPEC_MOUNT}/{study_name}.toml", "--results", results, *passed]
    return run, [*DRIVER, "resume", results, *passed]


def entrypoint(study_name: str, passed: list[str]) -> str:
    """`sh -c "..."`: the same string whether KubeRay posts it (HTTPMode) or pastes it into
    its submitter's shell line, where `ray job submit` quotes it again (K8sJobMode)."""
    run, resume = driver_commands(study_name, passed)
    for word in run + resume:
        if _UNSAFE.search(word):
            raise SpecError(f"study k8s: {word!r} holds a quote, '$', '`', '\\' or a control "
                            "character, which the job's shell lines cannot carry; use a "
                            "value without them")
    q = shlex.join
    script = (f"if [ -f {RESULTS_MOUNT}/{shlex.quote(study_name)}/spec.toml ]; "
              f"then {q(resume)}; else {q(run)}; fi")
    return f'sh -c "{script}"'


def _cpu(c: float) -> str:
    return str(int(c)) if c == int(c) else f"{round(c * 1000)}m"


def _check(spec, args) -> None:
    """Everything that can be refused, before anything is written."""
    def bad(msg: str):
        raise SpecError(f"study k8s: {msg}")

    if not args.image.strip() or any(ch.isspace() for ch in args.image):
        bad(f"--image {args.image!r} is not an image reference; give e.g. ghcr.io/ORG/study:TAG")
    if args.workers < 1:
        bad(f"--workers must be at least 1 (the head runs no cells), got {args.workers}")
    if args.gpus_per_worker < 0 or args.cpus_per_worker <= 0 or args.head_cpus <= 0:
        bad("--gpus-per-worker must be 0 or more, --cpus-per-worker and --head-cpus more than 0")
    if args.backoff_limit < 0:
        bad(f"--backoff-limit must be 0 or more, got {args.backoff_limit}")
    for flag, value in (("--memory-per-worker", args.memory_per_worker),
                        ("--head-memory", args.head_memory), ("--storage", args.storage)):
        if not _QUANTITY.fullmatch(value):
            bad(f"{flag} {value!r} is not a Kubernetes quantity; give e.g. 16Gi or 500M")
    if args.namespace is not None and not (_DNS_LABEL.fullmatch(args.namespace)
                                           and len(args.namespace) <= 63):
        bad(f"--namespace {args.namespace!r} is not a namespace name (lower-case letters, "
            "digits and '-')")
    if args.storage_class is not None and not _DNS_SUBDOMAIN.fullmatch(args.storage_class):
        bad(f"--storage-class {args.storage_class!r} is not a StorageClass name")
    gpus = args.gpus_per_trial or 0
    if gpus > args.gpus_per_worker:
        bad(f"--gpus-per-trial {gpus:g} is more than a worker has (--gpus-per-worker "
            f"{args.gpus_per_worker}); no cell could start. Give workers more GPUs or a "
            "cell fewer")
    cpus = 1 if args.cpus_per_trial is None else args.cpus_per_trial
    if cpus > args.cpus_per_worker:
        bad(f"--cpus-per-trial {cpus:g} is more than a worker has (--cpus-per-worker "
            f"{args.cpus_per_worker:g}); give workers more CPUs or a cell fewer")
    if spec.name.startswith("."):
        bad(f"study.name {spec.name!r} starts with '.'; name the study with a letter or digit")
    pilot = spec.analysis.get("pilot")
    if pilot and not pilot.startswith(f"{RESULTS_MOUNT}/"):
        bad(f"the spec's analysis.pilot {pilot!r} is a folder the head pod cannot see; "
            f"copy the pilot onto the results volume and name it as {RESULTS_MOUNT}/...")
    from ..cli import DEFAULT_MAX_CELLS

    limit, bound = args.max_cells or DEFAULT_MAX_CELLS, spec.max_cells()
    if bound > limit:
        bad(f"the grid of {spec.origin} has up to {bound:,} cells, more than the limit of "
            f"{limit:,}; shrink an axis, or pass --max-cells {bound}")
    from sweep.fusion import parse_fuse

    from ..export import parse_targets
    from ..sequential_run import check_flags

    from ..bundles import parse_bundle

    for given, parse in ((args.fuse, parse_fuse), (args.bundle, parse_bundle)):
        if given is not None:
            with as_spec_error(ValueError):
                parse(given)
    parse_targets(args.export)
    check_flags(spec, args)


def _labels(name: str) -> dict:
    return {"app.kubernetes.io/name": "study", "app.kubernetes.io/instance": name}


def _meta(name: str, job: str, namespace: str | None) -> dict:
    meta = {"name": name, "labels": _labels(job)}
    if namespace:
        meta["namespace"] = namespace
    return meta


def _resources(cpus: float, memory: str, gpus: int = 0) -> dict:
    amount = {"cpu": _cpu(cpus), "memory": memory}
    if gpus:
        amount["nvidia.com/gpu"] = str(gpus)
    return {"requests": dict(amount), "limits": dict(amount)}


# How every Ray process finds the token: by file, so it never shows in a pod's spec.
AUTH_ENV = [{"name": "RAY_AUTH_MODE", "value": "token"},
            {"name": "RAY_AUTH_TOKEN_PATH", "value": f"{TOKEN_DIR}/{TOKEN_KEY}"}]


def _token_volume(secret: str) -> dict:
    # 0400: readable by the owner only (the fs group too, which kubelet adds for fsGroup).
    return {"name": "ray-token", "secret": {"secretName": secret, "defaultMode": 0o400}}


TOKEN_MOUNT = {"name": "ray-token", "mountPath": TOKEN_DIR, "readOnly": True}


def _pod_template(container: dict, volumes: list, fs_group: int,
                  restart_policy: str | None = None) -> dict:
    spec = {"securityContext": {"fsGroup": fs_group}, "containers": [container],
            "volumes": volumes}
    if restart_policy:
        spec["restartPolicy"] = restart_policy
    return {"spec": spec}


def build_manifest(spec, args, token: str) -> list[dict]:
    """The ConfigMap, Secret, PersistentVolumeClaim and RayJob, in the order to apply them."""
    job = job_name(spec.name)
    ns = args.namespace
    names = {"spec": f"{job}-spec", "token": f"{job}-ray-token", "results": f"{job}-results"}
    config_map = {"apiVersion": "v1", "kind": "ConfigMap",
                  "metadata": _meta(names["spec"], job, ns), "data": {SPEC_KEY: spec.source}}
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": _meta(names["token"], job, ns),
              "type": "Opaque",
              "data": {TOKEN_KEY: base64.b64encode(token.encode()).decode()}}
    pvc_spec = {"accessModes": ["ReadWriteOnce"],
                "resources": {"requests": {"storage": args.storage}}}
    if args.storage_class:
        pvc_spec["storageClassName"] = args.storage_class
    pvc = {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
           "metadata": _meta(names["results"], job, ns), "spec": pvc_spec}
    # Ray's workers at nice 0, as the local Ray the tool starts (README, Running on a cluster).
    env = [*AUTH_ENV, {"name": "RAY_worker_niceness", "value": "0"}]
    head = {"name": "ray-head", "image": args.image, "env": env,
            "resources": _resources(args.head_cpus, args.head_memory),
            "ports": [{"containerPort": 6379, "name": "gcs-server"},
                      {"containerPort": 8265, "name": "dashboard"},
                      {"containerPort": 10001, "name": "client"}],
            "volumeMounts": [TOKEN_MOUNT,
                             {"name": "results", "mountPath": RESULTS_MOUNT},
                             {"name": "spec", "mountPath": SPEC_MOUNT, "readOnly": True}]}
    head_volumes = [_token_volume(names["token"]),
                    {"name": "results", "persistentVolumeClaim": {"claimName": names["results"]}},
                    {"name": "spec", "configMap": {"name": names["spec"], "items": [
                        {"key": SPEC_KEY, "path": f"{spec.name}.toml"}]}}]
    worker = {"name": "ray-worker", "image": args.image, "env": env,
              "resources": _resources(args.cpus_per_worker, args.memory_per_worker,
                                      args.gpus_per_worker),
              "volumeMounts": [TOKEN_MOUNT]}
    # The submitter pod runs `ray job submit` against the head's dashboard: it needs the token.
    submitter = {"name": "ray-job-submitter", "image": args.image, "env": list(AUTH_ENV),
                 "resources": {"requests": {"cpu": "500m", "memory": "256Mi"},
                               "limits": {"cpu": "1", "memory": "1Gi"}},
                 "volumeMounts": [TOKEN_MOUNT]}
    cluster = {
        "headGroupSpec": {
            # num-cpus 0: the head holds the driver and the store and runs no cells.
            "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
            "template": _pod_template(head, head_volumes, args.fs_group)},
        "workerGroupSpecs": [{
            "groupName": "workers", "replicas": args.workers, "minReplicas": args.workers,
            "maxReplicas": args.workers, "rayStartParams": {},
            "template": _pod_template(worker, [_token_volume(names["token"])], args.fs_group)}]}
    rayjob = {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": _meta(job, job, ns),
              "spec": {"entrypoint": entrypoint(spec.name, _passed_argv(args)),
                       "submissionMode": "K8sJobMode",
                       "shutdownAfterJobFinishes": True,
                       "backoffLimit": args.backoff_limit,
                       "rayClusterSpec": cluster,
                       "submitterPodTemplate": _pod_template(
                           submitter, [_token_volume(names["token"])], args.fs_group,
                           restart_policy="Never")}}
    return [config_map, secret, pvc, rayjob]


def fetch_pod(spec, args) -> dict:
    """A pod that mounts the results volume and waits, for `kubectl cp` once the job is over
    (shutdownAfterJobFinishes deletes the head pod, and the volume with it goes unmounted)."""
    job = job_name(spec.name)
    container = {"name": "fetch", "image": args.image, "command": ["sleep", "3600"],
                 "volumeMounts": [{"name": "results", "mountPath": RESULTS_MOUNT,
                                   "readOnly": True}]}
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": _meta(f"{job}-fetch", job, args.namespace)}
    pod.update(_pod_template(container, [{"name": "results", "persistentVolumeClaim": {
        "claimName": f"{job}-results", "readOnly": True}}], args.fs_group, restart_policy="Never"))
    return pod


def dump_yaml(docs: list[dict]) -> str:
    import yaml

    class Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data) -> bool:
            return True  # each pod's env and mounts written out, not as &id001 / *id001

    def text(dumper, s: str):
        # the spec's TOML as a readable block, not one escaped line
        return dumper.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None)

    Dumper.add_representer(str, text)
    # width: the entrypoint on one line, as the job will run it
    return yaml.dump_all(docs, Dumper=Dumper, sort_keys=False, default_flow_style=False,
                         width=1 << 16)


def _write(path: Path, text: str, mode: int) -> None:
    """Written with `mode` from its first byte (never readable by others, even for a moment)."""
    from ..atomic import atomic_write

    def write(tmp: Path) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), mode)  # the umask may have taken bits away; none added
            f.write(text)

    atomic_write(path, write)


def cmd_k8s(args) -> int:
    spec = load_spec(args.spec)
    if args.gpus_per_trial is None and args.gpus_per_worker:
        args.gpus_per_trial = 1.0  # GPUs asked for on the workers are for the cells
    _check(spec, args)
    job = job_name(spec.name)
    out = Path(args.manifest_dir) if args.manifest_dir else Path("results") / spec.name / "k8s"
    manifest, fetch = out / MANIFEST_FILE, out / FETCH_FILE
    token = secrets.token_hex(32)
    text = dump_yaml(build_manifest(spec, args, token))
    try:
        out.mkdir(parents=True, exist_ok=True)
        _write(manifest, text, 0o600)
        try:
            _write(fetch, dump_yaml([fetch_pod(spec, args)]), 0o644)
        except OSError:
            manifest.unlink(missing_ok=True)
            raise
    except OSError as e:
        raise ClusterError(f"cannot write the manifests into {out}: {e.strerror or e}; choose "
                           "a writable folder with --manifest-dir") from None
    n = f" -n {args.namespace}" if args.namespace else ""
    print(f"wrote {manifest} (mode 0600: it holds the Secret with this study's Ray token; "
          "keep it private, never commit it)")
    print(f"wrote {fetch} (a pod to copy the results out once the job is over)")
    cpus = 1 if args.cpus_per_trial is None else args.cpus_per_trial
    print(f"cells: {args.gpus_per_trial or 0:g} GPU and {cpus:g} CPU each, "
          f"on {args.workers} worker(s) of {args.gpus_per_worker} GPU and "
          f"{args.cpus_per_worker:g} CPU")
    print(f"start:  kubectl apply -f {manifest}")
    print(f"follow: kubectl{n} get rayjob {job} -w; kubectl{n} logs -f job/{job}")
    print(f"fetch:  kubectl apply -f {fetch}; kubectl{n} cp "
          f"{job}-fetch:{RESULTS_MOUNT}/{spec.name} results/{spec.name}-k8s; "
          f"kubectl{n} delete pod {job}-fetch")
    return 0
