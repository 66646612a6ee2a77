"""A real one-node SLURM in a temporary folder, for the `study slurm` tests.

munged with its own key and socket, slurmctld and slurmd in the foreground (their PIDs are
ours to stop), every state, spool, pid and log file under the folder, and free ports: nothing
of the machine's own SLURM or munge (if any) is used or touched. Commands reach this cluster
through SLURM_CONF (`env`). Stopped by PID, after its jobs are cancelled.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from procs import kill_tree

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol",
           "sinfo", "srun", "sbcast", "scancel")


def why_no_slurm() -> str | None:
    """Why this machine cannot run the one-node SLURM (None: it can)."""
    missing = [d for d in DAEMONS if not shutil.which(d)]
    if missing:
        return (f"SLURM or munge is not installed ({', '.join(missing)} not found); "
                "apt-get install slurmctld slurmd slurm-client munge")
    if os.geteuid() != 0:
        return "needs root (slurmd runs jobs as their user; SlurmUser=root)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    """munged + slurmctld + slurmd of one node (this machine) with `cpus` CPUs."""

    def __init__(self, cpus: int = 2):
        # munged wants every folder above its socket searchable by all and none writable by
        # others: a fresh folder under /tmp, mode 0755 (pytest's tmp folders are 0700)
        self.base = Path(tempfile.mkdtemp(prefix="study-slurm-", dir="/tmp"))
        self.base.chmod(0o755)
        self.host = socket.gethostname()
        self.cpus = cpus
        self.conf = self.base / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        for var in [v for v in self.env if v.startswith(("SBATCH_", "SQUEUE_", "SLURM_"))]:
            if var != "SLURM_CONF":  # nothing of an outer job or the user's defaults
                del self.env[var]
        self.procs: dict[str, subprocess.Popen] = {}

    def _write_conf(self) -> None:
        b = self.base
        for d in ("state", "spool", "log"):
            (b / d).mkdir()
        # job ids from a random start: Ray's temp folders and ports in the job script are
        # named by job id, and another session's cluster on this machine starts elsewhere
        first_job = random.randrange(1000, 60000)
        self.conf.write_text(f"""\
ClusterName=studytest
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={b}/munge/munge.socket
SlurmUser=root
SlurmdUser=root
StateSaveLocation={b}/state
SlurmdSpoolDir={b}/spool
SlurmctldPidFile={b}/slurmctld.pid
SlurmdPidFile={b}/slurmd.pid
SlurmctldLogFile={b}/log/slurmctld.log
SlurmdLogFile={b}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
KillWait=30
MinJobAge=600
FirstJobId={first_job}
MailProg=/bin/true
# jobs of `urgent` preempt jobs of `debug`: those get their --signal at once
# (preempt_send_user_signal; PreemptParameters=send_user_signal in newer SLURM) and GraceTime seconds before SLURM ends and requeues them
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SchedulerParameters=preempt_send_user_signal
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=120
PartitionName=urgent Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
""")

    def _spawn(self, name: str, *cmd: str) -> None:
        log = open(self.base / "log" / f"{name}.out", "wb")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                            env=self.env, start_new_session=True)
        log.close()

    def start(self, timeout: float = 60) -> None:
        self._write_conf()
        m = self.base / "munge"
        m.mkdir(mode=0o755)
        subprocess.run(["mungekey", "--create", f"--keyfile={m}/munge.key"], check=True,
                       capture_output=True)
        self._spawn("munged", "munged", "--foreground", "--force", f"--socket={m}/munge.socket",
                    f"--key-file={m}/munge.key", f"--pid-file={m}/munged.pid",
                    f"--log-file={m}/munged.log", f"--seed-file={m}/munged.seed")
        self._wait(lambda: (m / "munge.socket").exists(), 20, "munged's socket")
        self._spawn("slurmctld", "slurmctld", "-D", "-f", str(self.conf))
        self._spawn("slurmd", "slurmd", "-D", "-f", str(self.conf), "-N", self.host)
        self._wait(self.idle, timeout, "the node to be idle in sinfo")

    def idle(self) -> bool:
        """The node runs nothing (sinfo: `idle` in every partition)."""
        return set(self.run("sinfo", "-h", "-o", "%t").stdout.split()) == {"idle"}

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited ({p.returncode}) waiting for {what}: "
                                       + self.log_tail(name))
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}: "
                                   + " | ".join(self.log_tail(n) for n in self.procs))
            time.sleep(0.3)

    def log_tail(self, name: str, lines: int = 5) -> str:
        try:
            text = (self.base / "log" / f"{name}.out").read_text(errors="replace")
        except OSError:
            return ""
        return " / ".join(text.strip().splitlines()[-lines:])

    def daemon_lines(self, job_id: str) -> str:
        """What slurmctld and slurmd logged about a job (for a failed test's message)."""
        out = []
        for name in ("slurmctld", "slurmd"):
            try:
                text = (self.base / "log" / f"{name}.out").read_text(errors="replace")
            except OSError:
                continue
            out += [f"{name}: {ln}" for ln in text.splitlines() if job_id in ln]
        return "\n".join(out[-40:])

    def run(self, *cmd: str, check: bool = False, timeout: float = 60
            ) -> subprocess.CompletedProcess:
        """A SLURM command against this cluster."""
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=check,
                              timeout=timeout)

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as key=value pairs ({} once the job is forgotten)."""
        r = self.run("scontrol", "show", "job", "-o", job_id)
        fields = {}
        for word in r.stdout.split():
            key, sep, value = word.partition("=")
            if sep:
                fields[key] = value
        return fields

    def stop(self) -> None:
        """Cancel every job, wait for them to go, stop the daemons by PID."""
        jobs = []
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            jobs = self.run("squeue", "-h", "-t", "all", "-o", "%i").stdout.split()
            self.run("scancel", "--user=root")
            deadline = time.monotonic() + 90  # KillWait (30 s) and the epilogue
            while time.monotonic() < deadline:
                r = self.run("squeue", "-h", "-o", "%i")
                if r.returncode or not r.stdout.strip():
                    break
                time.sleep(1)
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                kill_tree(p.pid)
        # a job step's processes that outlived their job: Ray's, named by the job's own Ray
        # folder (the job script's /tmp/ray-study-<job id>), or anything naming this folder
        for job_id in jobs:
            kill_tree(marker=f"/ray-study-{job_id}/")
        kill_tree(marker=str(self.base))
        shutil.rmtree(self.base, ignore_errors=True)
