"""The sbatch script `study slurm` writes: one readable bash file that starts Ray on the job's
nodes, runs the study's driver on the first node, forwards SLURM's time-limit warning to it,
and requeues the job when the study is not finished. No SLURM is needed to write it.
"""
from __future__ import annotations

import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path

# With --shared-nodes, this job's Ray takes a block of ports named by the job id (Ray's fixed
# defaults, 6379, 10001, 52365, ..., would collide with another job's Ray on the same node).
# The blocks lie in 10000-32767, below Linux's ephemeral ports (32768 up), which the kernel
# hands to outgoing connections.
PORTS_FROM, PORTS_TO = 10000, 32768
FIXED_PORTS = 10  # the GCS, client server, object and node managers, agents, metrics


@dataclass
class SlurmJob:
    """What the script is written from (study/cluster/slurm.py checks every value first)."""
    study: str  # the spec's [study] name
    results: Path  # absolute
    nodes: int
    time: str  # as SLURM takes it
    lead_s: int  # USR1 this long before the time limit
    driver_options: list[str]  # `study run` options for the driver, in order
    cpus_per_node: int | None = None  # None: every CPU of the node (exclusive nodes)
    gpus_per_node: int = 0
    trials_per_node: int = 1  # the most trials one node holds (sizes the worker ports)
    partition: str | None = None
    account: str | None = None
    shared_nodes: bool = False
    python_prefix: str = ""  # sys.prefix of the python writing the script
    has_activate: bool = True  # the prefix is a virtual environment with bin/activate
    pythonpath: str | None = None
    settings: list[tuple[str, str]] = field(default_factory=list)  # STUDY_* knobs, as set
    extra_sbatch: list[str] = field(default_factory=list)

    @property
    def slurm_dir(self) -> Path:
        return self.results / "slurm"

    @property
    def job_name(self) -> str:
        """The study's name and its folder's: --dependency=singleton chains jobs by name, so
        two studies (or one study in two folders) never wait on each other."""
        import hashlib

        return f"study-{self.study}-{hashlib.sha256(str(self.results).encode()).hexdigest()[:6]}"

    @property
    def port_span(self) -> int:
        """Ports per job: the fixed ones and one per Ray worker process (a trial's, and a few
        of Tune's and the driver's), in hundreds."""
        return max(200, 100 * math.ceil((FIXED_PORTS + self.trials_per_node + 40) / 100))


def _q(value) -> str:
    return shlex.quote(str(value))


def _directives(job: SlurmJob) -> list[str]:
    d = [f"--job-name={job.job_name}", f"--nodes={job.nodes}", "--ntasks-per-node=1"]
    if job.cpus_per_node:
        d.append(f"--cpus-per-task={job.cpus_per_node}")
    if job.gpus_per_node:
        d.append(f"--gpus-per-node={job.gpus_per_node}")
    if not job.shared_nodes:
        d += ["--exclusive", "--mem=0"]  # the whole node: every CPU, GPU and byte of memory
    if job.nodes > 1:
        d.append("--no-kill")  # a lost worker node: Ray retries its cells on the others
    d.append(f"--time={job.time}")
    if job.partition:
        d.append(f"--partition={job.partition}")
    if job.account:
        d.append(f"--account={job.account}")
    d += [f"--signal=B:USR1@{job.lead_s}", "--requeue", "--open-mode=append",
          "--dependency=singleton", "--export=NONE", f"--chdir={job.results}",
          f"--output={job.slurm_dir}/%j.out", *job.extra_sbatch]
    return [f"#SBATCH {x}" for x in d]


def _header(job: SlurmJob) -> str:
    return f"""#!/bin/bash
# The study {job.study!r} on SLURM, written by `study slurm` (run it again to change this file).
#   submit:  sbatch {job.slurm_dir}/{job.study}.sbatch
#   follow:  study status {job.results}
# The results folder must be on a filesystem every node that may run this script sees (home,
# scratch): a requeued job may start on another node. Worker nodes need nothing shared.
# Near the time limit SLURM sends USR1 to this script; the driver has its cells checkpoint
# and exits, and the script requeues the job, whose next run resumes the study. A preempted
# job is requeued too.
"""


def _environment(job: SlurmJob) -> str:
    slurm = _q(job.slurm_dir)
    activate = (f"source {_q(Path(job.python_prefix) / 'bin' / 'activate')}" if job.has_activate
                else f'export PATH={_q(Path(job.python_prefix) / "bin")}:"$PATH"')
    pythonpath = f"export PYTHONPATH={_q(job.pythonpath)}\n" if job.pythonpath else ""
    pythonpath += "".join(f"export {k}={_q(v)}  # set where this file was written\n"
                          for k, v in job.settings)
    return f"""
set -u
RESULTS={_q(job.results)}
SLURM_FILES={slurm}
RUN=$(( ${{SLURM_RESTART_COUNT:-0}} + 1 ))
echo "[slurm] job $SLURM_JOB_ID, run $RUN, on $SLURM_JOB_NODELIST at $(date -Is)"
# a job submitted by hand is listed too (study status reads the list)
grep -qsx "$SLURM_JOB_ID" "$SLURM_FILES/jobs.txt" || echo "$SLURM_JOB_ID" >> "$SLURM_FILES/jobs.txt"

# The environment the script was written from. --export=NONE carries nothing of the
# submitter's: sbatch's default copies all of it into the job record, tokens included.
{activate}
{pythonpath}cd "$RESULTS"
# --export=NONE also sets SLURM_EXPORT_ENV=NONE, which would strip this environment from
# the srun steps below
export SLURM_EXPORT_ENV=ALL
export RAY_worker_niceness=0  # Ray's workers run at nice 15 otherwise, slower on a busy node

# Ray's token, made for this study ($SLURM_FILES/ray_token, mode 0600), copied to each
# node's local disk (a node may not see the results folder). Ray is given its path: the
# token is never in this file, an environment value or a command line.
TOKEN=/tmp/study-$SLURM_JOB_ID.token
sbcast --force --preserve "$SLURM_FILES/ray_token" "$TOKEN" || exit 1
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$TOKEN"
RAY_TMP=/tmp/ray-study-$SLURM_JOB_ID

# This script runs on the allocation's first node: Ray's head and the driver go there.
HEAD=$(hostname)
HEAD_IP=$(hostname --ip-address | awk '{{print $1}}')
case $HEAD_IP in 127.*|"") HEAD_IP=$(hostname -I | awk '{{print $1}}') ;; esac
"""


def _driver(job: SlurmJob) -> str:
    cpus = (f"CPUS={job.cpus_per_node}" if job.cpus_per_node else
            "CPUS=$SLURM_CPUS_ON_NODE  # every CPU of the node: it is this job's alone")
    opts = " ".join(_q(o) for o in job.driver_options)
    return f"""{cpus}

# The driver: `study run` the first time; `study resume` once the folder holds this spec
# (a requeued run, or a later job of the chain)
if cmp -s "$SLURM_FILES/spec.toml" "$RESULTS/spec.toml"; then
  STUDY=(resume "$RESULTS")
else
  STUDY=(run "$SLURM_FILES/spec.toml" --results "$RESULTS")
fi
STUDY+=({opts})
echo "[slurm] study ${{STUDY[*]}}"
PIDFILE=$SLURM_FILES/driver.$SLURM_JOB_ID.pid
rm -f "$PIDFILE"  # a requeued run keeps its job id: never signal the last run's PID
# bash writes its PID (the driver's: exec keeps it) for the trap below, then runs the driver
DRIVER=(bash -c 'echo $$ > "$0"; exec "$@"' "$PIDFILE" python -u -m study.cli "${{STUDY[@]}}")

# USR1 is SLURM's time-limit warning (--signal=B:USR1@{job.lead_s}: to this shell only): the
# driver gets it and has its in-flight cells checkpoint, lands what finished and exits.
# Before the driver runs, nothing is in flight: the start-up is stopped instead. TERM (scancel,
# preemption, a requeue, the time limit itself) reaches every process of the job, the
# driver's and Ray's included, straight from SLURM: it is only noted here (the driver's second
# TERM would make it exit at once), and a job SLURM ends is not requeued from here.
WARNED=""
TERMINATED=""
STEP=""
on_usr1() {{
  WARNED=1
  if [ -s "$PIDFILE" ]; then kill -USR1 "$(cat "$PIDFILE")" 2>/dev/null
  elif [ -n "$STEP" ]; then kill -TERM "$STEP" 2>/dev/null
  fi
}}
trap on_usr1 USR1
trap 'TERMINATED=1' TERM
"""


def _ray_symmetric(job: SlurmJob) -> str:
    n, g = job.nodes, job.gpus_per_node
    gpus = f" --gpus-per-node={g}" if g else ""
    return f"""
# Ray on every node and the driver on this one: `ray symmetric-run` starts the head here and
# a worker on each other node, runs the driver as its child here, then stops Ray (the other
# nodes' Ray notice within a minute: the signal lead leaves room for it). Its `ray stop`
# stops every Ray on a node: right only on nodes this job holds alone (--exclusive).
export RAY_SYMMETRIC_RUN_CLUSTER_WAIT_TIMEOUT=600  # {n} nodes may take minutes to join
srun --nodes={n} --ntasks={n} --ntasks-per-node=1 --cpus-per-task="$CPUS"{gpus} \\
  ray symmetric-run --address "$HEAD_IP:6379" --min-nodes {n} \\
    --num-cpus "$CPUS" --num-gpus {g} --temp-dir "$RAY_TMP" --disable-usage-stats \\
    -- "${{DRIVER[@]}}" --address "$HEAD_IP:6379" &
STEP=$!
"""


def _ray_by_hand(job: SlurmJob) -> str:
    n, g, span = job.nodes, job.gpus_per_node, job.port_span
    slots = (PORTS_TO - PORTS_FROM) // span
    gpus = f" --gpus-per-node={g}" if g else ""
    workers = "" if n == 1 else f"""  srun --nodes={n - 1} --ntasks={n - 1} --ntasks-per-node=1 \\
    --cpus-per-task="$CPUS"{gpus} --exclude="$HEAD" \\
    ray start --block --address "$HEAD_IP:$BASE" "${{NODE_OPTS[@]}}" &
  RAY_NODES+=($!)
"""
    return f"""
# Ray by hand: other jobs may share these nodes, so this job's Ray has ports of its own, a
# block of {span} named by the job id (jobs whose ids differ by a multiple of {slots} would
# share one), its own temp folder, and is stopped by PID (`ray stop` stops every Ray on a node).
BASE=$(( {PORTS_FROM} + SLURM_JOB_ID % {slots} * {span} ))
NODE_OPTS=(--num-cpus "$CPUS" --num-gpus {g} --temp-dir "$RAY_TMP" --disable-usage-stats
  --object-manager-port $((BASE + 2)) --node-manager-port $((BASE + 3))
  --dashboard-agent-grpc-port $((BASE + 4)) --dashboard-agent-listen-port $((BASE + 5))
  --runtime-env-agent-port $((BASE + 6)) --metrics-export-port $((BASE + 7))
  --min-worker-port $((BASE + {FIXED_PORTS})) --max-worker-port $((BASE + {span - 1})))
srun --nodes=1 --ntasks=1 --cpus-per-task="$CPUS"{gpus} --nodelist="$HEAD" \\
  ray start --head --block --node-ip-address "$HEAD_IP" --port "$BASE" \\
    --ray-client-server-port $((BASE + 1)) --include-dashboard false "${{NODE_OPTS[@]}}" &
RAY_NODES=($!)
# the other nodes and the driver once the head answers (the driver's ray.init waits for this
# node to join; cells start on the other nodes as they join)
for _ in $(seq 300); do
  [ -n "$WARNED$TERMINATED" ] && break
  (exec 3<>"/dev/tcp/$HEAD_IP/$BASE") 2>/dev/null && break
  sleep 1
done
if [ -z "$WARNED$TERMINATED" ]; then
{workers}  "${{DRIVER[@]}}" --address "$HEAD_IP:$BASE" &
  STEP=$!
fi
"""


def _finish(job: SlurmJob) -> str:
    n = job.nodes
    stop_ray = "" if not job.shared_nodes else """echo "[slurm] stopping Ray"
kill -TERM "${RAY_NODES[@]}" 2>/dev/null  # srun ends its step: every process of it
for pid in "${RAY_NODES[@]}"; do
  while jobs -pr | grep -qx "$pid"; do wait "$pid"; done
done
"""
    return f"""
# A trapped signal ends `wait` early: wait again while the child runs (bash's own job list,
# not its PID, which the system may give to another process once it is gone)
RC=1
if [ -n "$STEP" ]; then
  while :; do
    wait "$STEP"; RC=$?
    jobs -pr | grep -qx "$STEP" || break
  done
fi
rm -f "$PIDFILE"
echo "[slurm] driver exited with $RC at $(date -Is)"
{stop_ray}if [ -z "$TERMINATED" ]; then  # (a job SLURM is ending starts no step)
  srun --overlap --nodes={n} --ntasks={n} --ntasks-per-node=1 rm -rf "$TOKEN" "$RAY_TMP"
fi

# A job preempted with a grace time: SLURM ends its steps (Ray) at once and this script only
# at the grace time's end; a script that ends first (the driver lost Ray) ends the job as
# FAILED, and SLURM does not requeue it.
PREEMPTED=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | grep -o 'PreemptTime=[^ ]*')
case $PREEMPTED in ""|*=None|*=Unknown) PREEMPTED="" ;; esac
if [ -n "$WARNED$PREEMPTED" ] && [ -z "$TERMINATED" ]; then
  # SLURM does not requeue a job that reaches its time limit, even with --requeue. A driver
  # that exited 0 after the warning is requeued too (a Ray Tune of its own takes USR1 as
  # "stop the run"): the next run resumes, or finds nothing left and ends at once.
  why=${{PREEMPTED:+preempted}}
  echo "[slurm] stopped (${{why:-time-limit warning}}); requeued to resume the study"
  scontrol requeue "$SLURM_JOB_ID"
elif [ "$RC" -eq 0 ]; then
  # the study is finished: the jobs of its chain still waiting have nothing to do
  scancel --state=PENDING --name="$SLURM_JOB_NAME" --user="$(id -un)"
fi
exit "$RC"
"""


def render(job: SlurmJob) -> str:
    """The whole script."""
    return (_header(job) + "\n".join(_directives(job)) + "\n" + _environment(job)
            + _driver(job) + (_ray_by_hand(job) if job.shared_nodes else _ray_symmetric(job))
            + _finish(job))
