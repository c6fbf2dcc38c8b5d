"""ShardLock: one live run per shard of an output folder, safe from cron and Slurm requeues.

The lock is a small JSON file `_lock-<i>-of-<n>.json` in the output folder (a leading `_` so
readers of the folder skip it). It names its holder (host, pid, Slurm ids) and carries a
heartbeat that a daemon thread refreshes. Only plain file operations are used (exclusive
create, rename, unlink), so it works on the shared filesystems of a cluster where `flock`
is often missing or local to one node.

A lock is stale when its holder is on this host and its pid is dead (or reused by another
process), when its heartbeat is older than `stale_after` seconds (the holder's node died),
when it was written by our own Slurm job id (a requeued task meeting its earlier run's lock),
or when it was written by another job of our user on our cluster that Slurm says is over
(gone from the queue or in an ended state, `slurm.job_has_ended`): a task resubmitted after
its node died need not wait for the heartbeat to age. When Slurm cannot be asked (no
`squeue`, controller down, timeout) the heartbeat rule decides: a live job's lock is never
taken on a guess.
Shards of other splits of the folder (another shard count: a cron run without --shard while
a Slurm array or a --data-parallel launch holds shards i/N) share parts with ours whenever
their indexes agree modulo the gcd of the counts; a live lock on such a shard holds ours too,
so `acquire` gives way to it (checked after our lock exists, so of two such runs starting at
once at least one sees the other), instead of redoing that run's parts beside it and deleting
the temp files it is writing.
Taking a stale lock over is a compare-and-swap: the taker first creates, exclusively, a
claim file named after the exact stale content it saw (holder token + heartbeat), checks
that the lock still holds that content, and only then removes it and creates its own. Two
takers of the same stale lock race for the one claim name, so exactly one of them wins.
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

from batchgen.job.slurm import job_has_ended

try:
    import psutil
except ImportError:  # psutil is a dependency; fall back to kill(0) without it
    psutil = None

_SLURM_KEYS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID",
               "SLURM_CLUSTER_NAME")
# A claim file older than this is left over from a taker that died mid-takeover.
_CLAIM_STALE_AFTER = 60.0
_LOCK_NAME = re.compile(r"^_lock-(\d+)-of-(\d+)\.json$")


class LockHeldError(RuntimeError):
    """Raised by `with ShardLock(...)` when another live run holds the shard."""


class ShardLock:
    """Exclusive, heartbeated lock on shard `shard_index` of `num_shards` in `out_dir`.

    `acquire()` returns False when a live run holds it (see `holder_description()`);
    `release()` removes it if it is still ours. `with lock:` acquires (raising LockHeldError
    when held elsewhere) unless already acquired, and always releases.
    """

    def __init__(self, out_dir: Path, shard_index: int, num_shards: int, *,
                 stale_after: float = 180.0, heartbeat_every: float = 15.0,
                 env: Mapping[str, str] | None = None) -> None:
        if num_shards < 1 or not 0 <= shard_index < num_shards:
            raise ValueError(f"shard must be I/N with 0 <= I < N, got {shard_index}/{num_shards}")
        if heartbeat_every <= 0 or stale_after <= heartbeat_every:
            raise ValueError(f"need 0 < heartbeat_every ({heartbeat_every}) "
                             f"< stale_after ({stale_after})")
        self.out_dir = Path(out_dir)
        self.shard_index = shard_index
        self.num_shards = num_shards
        self.stale_after = stale_after
        self.heartbeat_every = heartbeat_every
        self.path = self.out_dir / f"_lock-{shard_index}-of-{num_shards}.json"
        self._env = os.environ if env is None else env
        self._token = uuid.uuid4().hex
        self._start_time = time.time()
        self._is_held = False
        self.is_lost = False  # set by the heartbeat when someone else took the lock from us
        self._holder: dict[str, Any] | None = None  # the other holder seen by the last acquire
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mutex = threading.Lock()  # heartbeat vs release

    # ---- public API -------------------------------------------------------------------

    @property
    def is_held(self) -> bool:
        return self._is_held and not self.is_lost

    def acquire(self) -> bool:
        if self._is_held:
            return not self.is_lost
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._start_time = time.time()
        for _ in range(8):  # each turn either decides or saw the lock change under it
            if _create_exclusive(self.path, self._content(time.time()), self._tmp_path()):
                return self._hold_unless_overlapped()
            seen = self._read()
            if seen is None:  # vanished between our create and our read: try again
                continue
            self._holder = seen
            if not self._is_stale(seen):
                return False
            if self._take_over(seen):
                return self._hold_unless_overlapped()
        return False

    def _hold_unless_overlapped(self) -> bool:
        """Our lock file exists: keep it (heartbeat) unless a live run of another split holds
        a shard sharing parts with ours; then remove it again and name that run."""
        rival = _overlapping_live_lock(self)
        if rival is not None:
            _unlink_quietly(self.path)
            self._holder = rival
            return False
        self._start_heartbeat()
        return True

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._mutex:
            if self._is_held and not self.is_lost and self._is_ours(self._read()):
                _unlink_quietly(self.path)
            self._is_held = False

    def holder_description(self) -> str:
        info = self._content_dict(time.time()) if self.is_held else self._holder
        if info is None:
            return f"nobody holds {self.path.name}"
        if "unreadable" in info:
            return f"{info['unreadable']} (unreadable, written {_age(info['heartbeat'])} ago)"
        parts = [f"host {info.get('host')} pid {info.get('pid')}"]
        if info.get("shard") not in (None, f"{self.shard_index}/{self.num_shards}"):
            parts[0] = f"shard {info['shard']} held by {parts[0]}"  # another split's
        job = info.get("slurm_array_job_id") or info.get("slurm_job_id")
        if job:
            task = info.get("slurm_array_task_id")
            parts.append(f"Slurm job {job}" + (f"_{task}" if task else ""))
        if info.get("start_time"):
            parts.append(f"started {_iso(info['start_time'])}")
        if info.get("heartbeat"):
            parts.append(f"last heartbeat {_age(info['heartbeat'])} ago")
        return ", ".join(parts)

    def __enter__(self) -> "ShardLock":
        if not self.is_held and not self.acquire():
            raise LockHeldError(f"shard {self.shard_index}/{self.num_shards} of {self.out_dir} "
                                f"is held by {self.holder_description()}")
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # ---- content ----------------------------------------------------------------------

    def _content_dict(self, heartbeat: float) -> dict[str, Any]:
        pid = os.getpid()
        info: dict[str, Any] = {
            "host": socket.gethostname(), "pid": pid, "pid_start": _process_start(pid),
            "uid": os.getuid(),
            "token": self._token, "shard": f"{self.shard_index}/{self.num_shards}",
            "start_time": self._start_time, "heartbeat": heartbeat,
        }
        for key in _SLURM_KEYS:
            info[key.lower()] = self._env.get(key)
        return info

    def _content(self, heartbeat: float) -> bytes:
        return json.dumps(self._content_dict(heartbeat), indent=1).encode()

    def _read(self) -> dict[str, Any] | None:
        """The lock's content; None when there is no lock; a stub when it is unreadable
        (a holder that died between create and write), dated by the file's mtime."""
        try:
            data = self.path.read_bytes()
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        try:
            info = json.loads(data)
            if isinstance(info, dict) and "token" in info:
                return info
        except ValueError:
            pass
        return {"unreadable": self.path.name, "heartbeat": mtime,
                "token": "raw-" + hashlib.sha256(data).hexdigest()[:16]}

    def _is_ours(self, info: dict[str, Any] | None) -> bool:
        return info is not None and info.get("token") == self._token

    def _is_stale(self, info: dict[str, Any]) -> bool:
        heartbeat = info.get("heartbeat")
        if not isinstance(heartbeat, (int, float)) or time.time() - heartbeat > self.stale_after:
            return True
        if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int):
            return not _is_process_alive(info["pid"], info.get("pid_start"))
        job_id, holder_job = self._env.get("SLURM_JOB_ID"), info.get("slurm_job_id")
        if not job_id or not holder_job:
            return False
        # Slurm never runs one job id twice at once: a lock from our own job id is an earlier
        # run of this very task (requeued onto another node after a failure), not a rival.
        return holder_job == job_id or self._holder_job_has_ended(info)

    def _holder_job_has_ended(self, info: dict[str, Any]) -> bool:
        """Another job's fresh-looking lock may be left by a node that died a moment ago:
        Slurm knows. Asked only about our user's jobs on our cluster (job ids repeat across
        clusters sharing a filesystem; PrivateData=jobs shows other users' live jobs as
        unknown ids); a lock without those fields (an older batchgen's) is not asked about."""
        cluster = self._env.get("SLURM_CLUSTER_NAME")
        if not cluster or info.get("slurm_cluster_name") != cluster \
                or info.get("uid") != os.getuid():
            return False
        array, task = info.get("slurm_array_job_id"), info.get("slurm_array_task_id")
        # An array's last task shares its job id with the whole array: name the task itself.
        job = f"{array}_{task}" if array and task else str(info["slurm_job_id"])
        return job_has_ended(job) is True

    def _tmp_path(self) -> Path:
        return self.path.with_name(f"{self.path.stem}.tmp-{self._token}")

    # ---- takeover ---------------------------------------------------------------------

    def _take_over(self, stale: dict[str, Any]) -> bool:
        generation = f"{stale.get('token')}@{stale.get('heartbeat')}"
        digest = hashlib.sha256(generation.encode()).hexdigest()[:16]
        claim = self.path.with_name(f"{self.path.stem}.claim-{digest}")
        _remove_old_claim(claim)
        if not _create_exclusive(claim, self._token.encode(), self._tmp_path()):
            return False  # another taker claimed this same stale generation first
        try:
            now = self._read()
            if now is None or now.get("token") != stale.get("token") \
                    or now.get("heartbeat") != stale.get("heartbeat"):
                return False  # the lock changed since we judged it stale
            _unlink_quietly(self.path)
            return _create_exclusive(self.path, self._content(time.time()), self._tmp_path())
        finally:
            _unlink_quietly(claim)

    # ---- heartbeat --------------------------------------------------------------------

    def _start_heartbeat(self) -> None:
        self._is_held = True
        self.is_lost = False
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"lock-{self.path.name}",
                                        daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_every):
            with self._mutex:
                try:
                    if not self._is_ours(self._read()):
                        self.is_lost = True
                        return
                    tmp = self._tmp_path()
                    tmp.write_bytes(self._content(time.time()))
                    os.replace(tmp, self.path)
                except OSError:
                    # A full disk or quota, a shared filesystem's blip: beat again next time.
                    # A thread ended here would let the lock age into a taker's hands while
                    # this run goes on, never noticing it had lost the shard.
                    continue


def live_lock_holders(out_dir: Path, *, exclude: Path | None = None) -> list[str]:
    """Who holds a live lock on any shard (of any split) of `out_dir`, `exclude` (our own
    lock) aside, judged by the same staleness rules as a taker's."""
    holders = []
    for path in sorted(Path(out_dir).glob("_lock-*-of-*.json")):
        match = _LOCK_NAME.match(path.name)
        if match is None or (exclude is not None and path == Path(exclude)):
            continue
        try:
            probe = ShardLock(out_dir, int(match[1]), int(match[2]))
        except ValueError:  # a name no batchgen run writes (I >= N)
            continue
        info = probe._read()
        if info is None or probe._is_stale(info):
            continue
        probe._holder = info
        holders.append(f"shard {probe.shard_index}/{probe.num_shards} held by "
                       f"{probe.holder_description()}")
    return holders


def shards_overlap(index: int, num: int, other_index: int, other_num: int) -> bool:
    """Whether shard index/num and shard other_index/other_num share a part: some p with
    p % num == index and p % other_num == other_index (Chinese remainder theorem)."""
    return (index - other_index) % math.gcd(num, other_num) == 0


def _overlapping_live_lock(lock: ShardLock) -> dict[str, Any] | None:
    """The content of a live lock of another split of `lock`'s folder on a shard sharing
    parts with `lock`'s, judged by `lock`'s staleness rules; None when there is none."""
    for path in sorted(lock.out_dir.glob("_lock-*-of-*.json")):
        match = _LOCK_NAME.match(path.name)
        if match is None or int(match[2]) == lock.num_shards:
            continue
        index, num = int(match[1]), int(match[2])
        if not (0 <= index < num and shards_overlap(lock.shard_index, lock.num_shards, index, num)):
            continue
        probe = ShardLock(lock.out_dir, index, num, stale_after=lock.stale_after,
                          heartbeat_every=lock.heartbeat_every, env=lock._env)
        info = probe._read()
        if info is not None and not probe._is_stale(info):
            return info
    return None


# ---- file and process helpers ----------------------------------------------------------

def _create_exclusive(path: Path, data: bytes, tmp: Path) -> bool:
    """Create `path` holding `data` unless it exists. Readers never see it half written:
    the data goes to `tmp` first and is hard-linked in (link fails if `path` exists). On a
    filesystem without hard links, falls back to O_CREAT|O_EXCL and writes in place."""
    tmp.write_bytes(data)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
    finally:
        _unlink_quietly(tmp)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return True


def _remove_old_claim(claim: Path) -> None:
    try:
        if time.time() - claim.stat().st_mtime > _CLAIM_STALE_AFTER:
            _unlink_quietly(claim)
    except FileNotFoundError:
        pass


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _process_start(pid: int) -> float | None:
    if psutil is None:
        return None
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _is_process_alive(pid: int, recorded_start: float | None) -> bool:
    """Alive and the same process: a zombie is dead; a pid reused by a process started at
    another time is dead."""
    if psutil is None:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        if recorded_start is not None and abs(process.create_time() - recorded_start) > 1.0:
            return False
        return True
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def _age(timestamp: float) -> str:
    return f"{max(0.0, time.time() - timestamp):.0f} s"


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
