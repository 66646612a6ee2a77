"""`study slurm SPEC`: a study as a SLURM batch job (issue 31).

Writes one sbatch script into DIR/slurm/ (study/cluster/slurm_script.py), with the spec it
runs and a Ray token made for the study beside it; with --submit, submits it (K times with
--chain) and records the job ids in DIR/slurm/jobs.txt, which `study status` reads. Every
value is checked before anything is written: a bad one is one line and exit 2 (command line,
spec) or 3 (environment), nothing written or submitted.
"""
from __future__ import annotations

import math
import os
import re
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

from sweep import SpecError, load_spec
from sweep.spec import as_spec_error

from ..errors import ClusterError
from ..store import StoreError
from .slurm_script import SlurmJob, render

DEFAULT_LEAD_S = 300  # the time-limit warning: an epoch of most cells, and Ray's shutdown
LEAD_FRACTION = 2  # ... at most half of the time limit
MAX_LEAD_S = 65535  # SLURM keeps --signal's time in 16 bits
JOBS_FILE = "jobs.txt"

# --time as SLURM reads it (src/common/parse_time.c): minutes, minutes:seconds,
# hours:minutes:seconds, days-hours, days-hours:minutes, days-hours:minutes:seconds
_TIME = re.compile(r"(?:(\d+)-(?:(\d+)(?::(\d+)(?::(\d+))?)?)?|(\d+)(?::(\d+)(?::(\d+))?)?)")
_TIME_FORMS = "MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"
# a partition list ("a,b") or an account: nothing a #SBATCH line or a shell would split
_NAME = re.compile(r"[A-Za-z0-9_.,-]+")


def add_slurm_parser(sub) -> None:
    """The `slurm` subcommand's options."""
    p = sub.add_parser("slurm", help="write a SLURM batch script that runs the study on a "
                                     "cluster (and submit it with --submit)")
    p.add_argument("spec", help="spec file or preset name")
    p.add_argument("--results", help="results folder (default results/<study name>), on a "
                   "filesystem every node that may run the job's script sees")
    p.add_argument("--nodes", type=int, default=1, help="nodes of the job (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=0, metavar="G")
    p.add_argument("--cpus-per-node", type=int, metavar="C",
                   help="CPUs per node (default: every CPU of the node; needed with "
                        "--shared-nodes)")
    p.add_argument("--time", required=True, metavar="[D-]HH:MM:SS",
                   help=f"the job's time limit, as SLURM takes it ({_TIME_FORMS})")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--data-dir", help="folder holding datasets, on the first node of the job")
    p.add_argument("--download", action="store_true",
                   help="download missing datasets into --data-dir (the first node needs a "
                        "network; else download first with `study run` on a login node)")
    p.add_argument("--shared-nodes", action="store_true",
                   help="share nodes with other jobs (no --exclusive): Ray on ports of this "
                        "job's own, started and stopped by PID")
    p.add_argument("--chain", type=int, default=1, metavar="K",
                   help="submit K jobs that run one after another (--dependency=singleton) "
                        "until the study is finished; the rest are cancelled then")
    p.add_argument("--signal-lead", type=int, metavar="SECONDS",
                   help=f"warn the driver this long before the time limit (default "
                        f"{DEFAULT_LEAD_S}, or a quarter of a shorter --time; at most "
                        f"1/{LEAD_FRACTION} of it): its cells checkpoint, the job requeues "
                        "itself")
    p.add_argument("--submit", action="store_true", help="submit the script (sbatch)")
    # `study run`'s options that mean something on a cluster, passed on to the driver
    p.add_argument("--cpus-per-trial", type=float, default=1)
    p.add_argument("--gpus-per-trial", type=float,
                   help="GPUs per cell (default 1 with --gpus-per-node, else 0)")
    p.add_argument("--fuse", metavar="K|auto|off")
    p.add_argument("--bundle", metavar="N|auto|off")
    p.add_argument("--export", action="append", default=[], metavar="TRACKER[=WHERE]")
    p.add_argument("--max-failures", type=int)
    p.add_argument("--max-concurrent", type=int)


def parse_time(text: str) -> int:
    """--time in seconds, as SLURM reads it; SpecError for what SLURM refuses, and for no
    limit at all (the warning before the limit needs one)."""
    t = text.strip()
    if t.lower() in ("infinite", "unlimited", "-1"):
        raise SpecError(f"--time {text}: the job needs a time limit (the study is warned "
                        f"before it); give one as {_TIME_FORMS}")
    m = _TIME.fullmatch(t)
    if not m:
        raise SpecError(f"--time {text!r} is not a time SLURM takes: use {_TIME_FORMS}")
    d, dh, dm, ds, a, b, c = (int(x) if x else 0 for x in m.groups())
    if m.group(1) is not None:
        secs = d * 86400 + dh * 3600 + dm * 60 + ds
    elif m.group(7) is not None:
        secs = a * 3600 + b * 60 + c  # HH:MM:SS
    else:
        secs = a * 60 + b  # MM or MM:SS
    if secs == 0:
        raise SpecError(f"--time {text}: zero is no time limit to SLURM; give one as {_TIME_FORMS}")
    if secs >= 2 ** 31:
        raise SpecError(f"--time {text} is more than SLURM can hold")
    return 60 * math.ceil(secs / 60)  # SLURM rounds the limit up to whole minutes


def signal_lead(given: int | None, limit_s: int) -> int:
    """The warning's lead: DEFAULT_LEAD_S, or a quarter of a short limit; a given lead at
    most half of it (the job would spend the rest stopping)."""
    if given is None:
        return max(1, min(DEFAULT_LEAD_S, limit_s // 4))
    most = min(limit_s // LEAD_FRACTION, MAX_LEAD_S)
    if not 1 <= given <= most:
        raise SpecError(f"--signal-lead {given}: give between 1 and {most} seconds (at most "
                        f"1/{LEAD_FRACTION} of the {limit_s // 60}-minute time limit)")
    return given


def _check_sizes(args) -> None:
    if args.nodes < 1 or args.gpus_per_node < 0 or (args.cpus_per_node or 1) < 1:
        raise SpecError("--nodes and --cpus-per-node take 1 or more, --gpus-per-node 0 or more")
    if args.chain < 1:
        raise SpecError(f"--chain {args.chain}: give the number of jobs, 1 or more")
    if args.shared_nodes and not args.cpus_per_node:
        raise SpecError("--shared-nodes needs --cpus-per-node C: on a shared node the job has "
                        "only the CPUs it asks for")
    if args.cpus_per_trial <= 0 or args.gpus_per_trial < 0:
        raise SpecError("--cpus-per-trial takes more than 0, --gpus-per-trial 0 or more")
    if args.gpus_per_trial > args.gpus_per_node:
        raise SpecError(f"--gpus-per-trial {args.gpus_per_trial:g} is more than the "
                        f"--gpus-per-node {args.gpus_per_node} a node of the job has; a trial "
                        "never spans nodes")
    if args.cpus_per_node and args.cpus_per_trial > args.cpus_per_node:
        raise SpecError(f"--cpus-per-trial {args.cpus_per_trial:g} is more than the "
                        f"--cpus-per-node {args.cpus_per_node}; a trial never spans nodes")
    if args.max_failures is not None and args.max_failures < 0:
        raise SpecError(f"--max-failures {args.max_failures}: give 0 or more")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise SpecError(f"--max-concurrent {args.max_concurrent}: give 1 or more")
    for flag, value in (("--partition", args.partition), ("--account", args.account)):
        if value is not None and not _NAME.fullmatch(value):
            raise SpecError(f"{flag} {value!r}: SLURM names hold letters, digits, '_', '.', '-'")


def _trials_per_node(args) -> int:
    fits = [args.cpus_per_node / args.cpus_per_trial] if args.cpus_per_node else [1]
    if args.gpus_per_trial:
        fits.append(args.gpus_per_node / args.gpus_per_trial)
    return max(1, int(min(fits)))


def _results_folder(args, spec) -> Path:
    results = Path(args.results or Path("results") / spec.name).expanduser().resolve()
    if re.search(r"[\s%]", str(results)):
        # sbatch splits #SBATCH lines at blanks, and reads % in --output as a pattern
        raise SpecError(f"results folder {results}: a job's folder may not hold blanks or '%'; "
                        "choose another --results")
    return results


def _check_owner(results: Path, spec) -> None:
    """Refuse a results folder that holds another study, as `study run` would: a study of
    another name, or one whose spec this one does not extend (sweep.Spec.check_extends)."""
    from ..counts import StudyGrid
    from ..store import Store

    store = Store(results)
    if not store.exists():
        return
    try:
        saved = StudyGrid.saved(store)
        name = saved.name
    except (OSError, UnicodeDecodeError) as e:
        raise StoreError(f"cannot read the study in {results}: {e}") from None
    if name != spec.name:
        raise SpecError(f"results folder {results} holds the study {name!r}, not "
                        f"{spec.name!r}; give this study another --results folder")
    if saved.source != spec.source:
        spec.check_extends(saved.spec)


def _check_partition(args, limit_s: int, required: bool) -> None:
    """The partition exists and takes the time limit, asked of `sinfo` where it is there; a
    SLURM that does not answer matters only to --submit."""
    if not shutil.which("sinfo"):
        return
    r = _run(["sinfo", "-h", "-o", "%P %l"])
    if r.returncode != 0:
        if required:
            raise ClusterError(f"cannot reach SLURM to submit: {_last_line(r.stderr)}")
        return
    limits, default = {}, None
    for line in r.stdout.splitlines():
        name, _, limit = line.strip().partition(" ")
        if name.endswith("*"):
            name = default = name[:-1]
        limits[name] = limit.strip()
    asked = args.partition.split(",") if args.partition else [default] if default else []
    for part in asked:
        if part not in limits:
            raise SpecError(f"--partition {part}: no such partition here; partitions: "
                            + ", ".join(sorted(limits)))
        most = limits[part]
        if most.lower() not in ("infinite", "unlimited", "n/a", ""):
            try:
                most_s = parse_time(most)
            except SpecError:
                continue
            if limit_s > most_s:
                raise SpecError(f"--time {args.time} is longer than the {most} partition "
                                f"{part} allows; give at most {most}")


def _check_data(spec, args) -> None:
    """The datasets are where the job's first node will look (the results folder's
    filesystem, or another every node sees): a job that would wait in the queue only to
    refuse at once is refused now. With --download the job fetches them."""
    if args.download:
        return
    from sweep.params import PARAMS

    from ..data import check_available

    for name in sorted(set(spec.grid.get("dataset") or [PARAMS["dataset"].default])):
        check_available(name, Path(args.data_dir).expanduser().resolve() if args.data_dir
                        else None)


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else "no message"


def _absolute_target(value: str) -> str:
    """An --export target with a folder (tensorboard=LOGDIR, mlflow=./mlruns) made absolute:
    the job runs in the results folder, not here. URIs stay as they are."""
    kind, sep, where = value.partition("=")
    if not sep or not where or ":" in where:
        return value
    return f"{kind}={Path(where).expanduser().resolve()}"


def _driver_options(args) -> list[str]:
    """`study run` options for the driver, each checked here first."""
    opts = ["--cpus-per-trial", f"{args.cpus_per_trial:g}",
            "--gpus-per-trial", f"{args.gpus_per_trial:g}"]
    if args.fuse is not None:
        from sweep.fusion import parse_fuse

        with as_spec_error(ValueError):
            opts += ["--fuse", str(parse_fuse(args.fuse))]
    if args.bundle is not None:
        from ..bundles import parse_bundle

        with as_spec_error(ValueError):
            opts += ["--bundle", str(parse_bundle(args.bundle))]
    if args.export:
        from ..export import MissingPackage, parse_targets, require

        for kind, _ in parse_targets(args.export):
            with as_spec_error(MissingPackage):
                require(kind)
        for value in args.export:
            opts += ["--export", _absolute_target(value)]
    if args.max_failures is not None:
        opts += ["--max-failures", str(args.max_failures)]
    if args.max_concurrent is not None:
        opts += ["--max-concurrent", str(args.max_concurrent)]
    if args.data_dir:
        opts += ["--data-dir", str(Path(args.data_dir).expanduser().resolve())]
    if args.download:
        opts.append("--download")
    return opts


def _make_token(path: Path) -> None:
    """The study's Ray token, made once, readable by its owner only."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        path.chmod(0o600)
        return
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))


def write_job(job: SlurmJob, spec_source: str) -> Path:
    """The spec, the token and the script into DIR/slurm/; returns the script's path."""
    from ..atomic import atomic_write_text
    from ..store.errors import os_message

    d = job.slurm_dir
    try:
        d.mkdir(parents=True, exist_ok=True)
        # the spec the job runs: the job does not depend on the folder it was submitted from
        atomic_write_text(d / "spec.toml", spec_source)
        _make_token(d / "ray_token")
        script = d / f"{job.study}.sbatch"
        atomic_write_text(script, render(job))
        script.chmod(0o755)
    except OSError as e:
        raise StoreError(os_message(e, d)) from None
    return script


def submit(script: Path, jobs: Path, times: int = 1) -> list[str]:
    """`sbatch` the script `times` times (a chain: the script's --dependency=singleton runs
    them one after another); each id is added to `jobs` as it is given."""
    ids: list[str] = []
    for _ in range(times):
        # --export=NONE here too: an SBATCH_EXPORT in the submitter's environment would
        # override the script's #SBATCH line
        r = subprocess.run(["sbatch", "--parsable", "--export=NONE", str(script)],
                           capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            done = f" (jobs {', '.join(ids)} of the chain were submitted)" if ids else ""
            raise ClusterError(f"sbatch refused the job: {_last_line(r.stderr)}{done}")
        ids.append(r.stdout.strip().split(";")[0])
        with open(jobs, "a") as f:
            f.write(ids[-1] + "\n")
    return ids


def cmd_slurm(args) -> int:
    spec = load_spec(args.spec)
    if args.gpus_per_trial is None:
        args.gpus_per_trial = 1.0 if args.gpus_per_node else 0.0
    limit_s = parse_time(args.time)
    lead = signal_lead(args.signal_lead, limit_s)
    _check_sizes(args)
    results = _results_folder(args, spec)
    _check_owner(results, spec)
    options = _driver_options(args)
    if args.submit and not shutil.which("sbatch"):
        raise ClusterError("sbatch is not on PATH: run `study slurm --submit` on a machine "
                           "that submits SLURM jobs (a login node), or leave out --submit")
    _check_partition(args, limit_s, required=args.submit)
    _check_data(spec, args)
    job = SlurmJob(study=spec.name, results=results, nodes=args.nodes, time=args.time.strip(),
                   lead_s=lead, driver_options=options, cpus_per_node=args.cpus_per_node,
                   gpus_per_node=args.gpus_per_node, trials_per_node=_trials_per_node(args),
                   partition=args.partition, account=args.account,
                   shared_nodes=args.shared_nodes, python_prefix=sys.prefix,
                   has_activate=(Path(sys.prefix) / "bin" / "activate").is_file(),
                   pythonpath=_absolute_pythonpath(), settings=_settings())
    script = write_job(job, spec.source)
    print(f"written: {script}")
    command = f"sbatch {script}"
    if not args.submit:
        print(f"submit with: {command}" if args.chain == 1 else
              f"submit with: for i in $(seq {args.chain}); do {command}; done")
        return 0
    ids = submit(script, job.slurm_dir / JOBS_FILE, args.chain)
    print(f"submitted: job{'s' if len(ids) > 1 else ''} {', '.join(ids)} ({command}); "
          f"follow with: study status {results}")
    return 0


# The study's own knobs a user may set in the environment; --export=NONE would leave them
# behind, so the script sets them as they were where it was written.
CARRIED_SETTINGS = ("STUDY_CHECKPOINT_EVERY_S", "STUDY_STOP_GRACE_S")
# Test hooks carried the same way, as they are (study.options.TrialOptions says what each does)
CARRIED_HOOKS = ("STUDY_EPOCH_HOLD",)


def _settings() -> list[tuple[str, str]]:
    found = [(k, os.environ[k].strip()) for k in CARRIED_SETTINGS if os.environ.get(k)]
    hooks = [(k, os.environ[k]) for k in CARRIED_HOOKS if os.environ.get(k)]
    for key, value in found:
        try:
            ok = float(value) > 0
        except ValueError:
            ok = False
        if not ok:
            raise SpecError(f"{key}={value!r}: give a number of seconds above 0, or unset it")
    return found + hooks


def _absolute_pythonpath() -> str | None:
    """PYTHONPATH as set here, its folders absolute (the job runs in the results folder)."""
    value = os.environ.get("PYTHONPATH")
    if not value:
        return None
    return os.pathsep.join(str(Path(p).resolve()) for p in value.split(os.pathsep) if p)


# -- `study status`: the study's SLURM jobs ---------------------------------------------------
def job_ids(results: Path) -> list[str]:
    """The job ids in DIR/slurm/jobs.txt, each once, in order."""
    try:
        lines = (Path(results) / "slurm" / JOBS_FILE).read_text().split()
    except OSError:
        return []
    return list(dict.fromkeys(x for x in lines if x.isdigit()))


def status_lines(results: Path) -> list[str]:
    """A line per job of the study: its state from squeue (sacct once squeue has forgotten
    it; "ended" where there is no sacct or no accounting)."""
    ids = job_ids(results)
    if not ids:
        return []
    if not shutil.which("squeue"):
        return [f"  slurm: jobs {', '.join(ids)} (no squeue here: states unknown)"]
    r = _run(["squeue", "-h", "-t", "all", "-j", ",".join(ids), "-o", "%i %T %r"])
    if r.returncode != 0:
        return [f"  slurm: jobs {', '.join(ids)} (squeue: {_last_line(r.stderr)})"]
    states = {}
    for line in r.stdout.splitlines():
        job, _, rest = line.strip().partition(" ")
        state, _, reason = rest.partition(" ")
        states[job] = state + (f" ({reason})" if reason and reason != "None" else "")
    gone = [i for i in ids if i not in states]
    if gone and shutil.which("sacct"):
        r = _run(["sacct", "-n", "-X", "-P", "-j", ",".join(gone), "-o", "JobID,State"])
        if r.returncode == 0:
            for line in r.stdout.splitlines():
                job, _, state = line.strip().partition("|")
                states.setdefault(job, state)
    return [f"  slurm: job {i} {states.get(i, 'ended')}" for i in ids]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(cmd, 1, "", f"{cmd[0]} did not answer in 60 s")


__all__ = ["add_slurm_parser", "cmd_slurm", "parse_time", "status_lines"]
