"""A throwaway one-node Slurm cluster on localhost for tests (Debian's slurm-wlm + munge).

Everything lives under one folder: the munge key and socket, slurm.conf, state, spool, pid
and log files. munged, slurmctld and slurmd run in the foreground as our children, so they
are stopped by pid. Client commands find the cluster through `SLURM_CONF` in `self.env`,
which the tests pass to every subprocess (nothing is set in our own environment).
Must run as root (slurmd starts jobs as the submitting user); CI runs as root.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo")


def missing_programs() -> list[str]:
    return [name for name in (*DAEMONS, *CLIENTS) if shutil.which(name) is None
            and not Path("/usr/sbin", name).exists()]


def _program(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    def __init__(self, root: Path, *, num_cpus: int = 2) -> None:
        self.root = Path(root)
        self.num_cpus = num_cpus
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.processes: dict[str, subprocess.Popen] = {}
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    # ---- lifecycle --------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> None:
        for sub in ("munge", "state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        self._start_munge()
        self.conf.write_text(self._slurm_conf())
        (self.root / "plugstack.conf").write_text("")
        self._spawn("slurmctld", [_program("slurmctld"), "-D", "-c", "-f", str(self.conf)])
        self._wait_for(lambda: self._run("scontrol", "ping").returncode == 0 and
                       "UP" in self._run("scontrol", "ping").stdout, timeout, "slurmctld")
        self._spawn("slurmd", [_program("slurmd"), "-D", "-f", str(self.conf), "-N", self.node])
        self._wait_for(self._is_node_idle, timeout, "slurmd (node idle)")

    def stop(self) -> None:
        """Cancel what is still queued (so no job outlives the cluster), then stop the
        daemons by pid: slurmd, slurmctld, munged."""
        if self._is_alive("slurmctld") and self._is_alive("slurmd"):
            try:
                jobs = self._run("squeue", "-h", "-o", "%A").stdout.split()
                if jobs:
                    self._run("scancel", *sorted(set(jobs)))
                    self._wait_for(lambda: not self._run("squeue", "-h").stdout.strip(), 30,
                                   "the queue to empty")
            except (RuntimeError, TimeoutError, subprocess.SubprocessError):
                pass
        for name in reversed(list(self.processes)):
            process = self.processes.pop(name)
            if process.poll() is None:
                os.kill(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.kill(process.pid, signal.SIGKILL)
                    process.wait()

    def __enter__(self) -> "SlurmCluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- client commands --------------------------------------------------------------

    def sbatch(self, script: Path, *extra: str) -> str:
        """Submit; returns the job id (the array job id for an array)."""
        result = self._run("sbatch", "--parsable", *extra, str(script))
        if result.returncode != 0:
            raise RuntimeError(f"sbatch failed: {result.stderr.strip()}")
        return result.stdout.strip().split(";")[0]

    def states(self, job_id: str) -> dict[str, str]:
        """{'<job>_<task>': state} of the tasks of `job_id` still in the queue (pending
        tasks may show together as '<job>_[0-2]')."""
        result = self._run("squeue", "-h", "-r", "-o", "%i %T")
        if result.returncode != 0:
            raise RuntimeError(f"squeue failed: {result.stderr.strip()}")
        pairs = (line.split() for line in result.stdout.splitlines() if line.strip())
        return {task: state for task, state in pairs
                if task == job_id or task.startswith(f"{job_id}_")}

    def wait_until_done(self, job_id: str, timeout: float) -> None:
        self._wait_for(lambda: not self.states(job_id), timeout, f"job {job_id} to finish")

    def job_info(self, job_id: str) -> str:
        return self._run("scontrol", "show", "job", job_id).stdout

    def scancel(self, job_id: str, *extra: str) -> None:
        result = self._run("scancel", *extra, job_id)
        if result.returncode != 0:
            raise RuntimeError(f"scancel failed: {result.stderr.strip()}")

    def logs(self) -> str:
        """The daemons' logs, for a failing test's message."""
        parts = []
        for path in sorted((self.root / "log").glob("*.log")):
            parts.append(f"==> {path.name} <==\n" + path.read_text(errors="replace")[-3000:])
        return "\n".join(parts)

    # ---- internals --------------------------------------------------------------------

    def _run(self, name: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([_program(name), *args], env=self.env, capture_output=True,
                              text=True, timeout=60)

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout.log", "wb")
        self.processes[name] = subprocess.Popen(argv, env=self.env, stdout=log,
                                                stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL)
        log.close()

    def _wait_for(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited with {process.returncode} while waiting "
                                       f"for {what}\n{self.logs()}")
            if predicate():
                return
            time.sleep(0.5)
        raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.logs()}")

    def _is_alive(self, name: str) -> bool:
        return name in self.processes and self.processes[name].poll() is None

    def _is_node_idle(self) -> bool:
        result = self._run("sinfo", "-h", "-n", self.node, "-o", "%T")
        return result.returncode == 0 and result.stdout.strip().startswith("idle")

    def _start_munge(self) -> None:
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        munge = self.root / "munge"
        self._spawn("munged", [
            _program("munged"), "--foreground", "--force", f"--socket={self.munge_socket}",
            f"--key-file={key}", f"--pid-file={munge / 'munged.pid'}",
            f"--seed-file={munge / 'munged.seed'}",
            f"--log-file={self.root / 'log' / 'munged.log'}"])
        self._wait_for(self.munge_socket.exists, 30, "munged's socket")

    def _slurm_conf(self) -> str:
        memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        r = self.root
        return "\n".join([
            "ClusterName=batchgentest",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            f"PlugStackConfig={r / 'plugstack.conf'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "MpiDefault=none",
            "ReturnToService=2",
            "JobRequeue=1",
            "KillWait=10",
            "MinJobAge=5",
            "SchedulerType=sched/builtin",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.num_cpus} "
            f"RealMemory={max(256, memory_mb // 2)} State=UNKNOWN",
            f"PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
            "",
        ])
