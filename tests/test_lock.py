"""ShardLock: exclusive per-shard lock files with a heartbeat and stale takeover."""
from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from batchgen.job.lock import LockHeldError, ShardLock


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _write_lock(path: Path, **fields) -> None:
    info = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": None,
            "token": "someone-else", "shard": "0/1", "start_time": time.time(),
            "heartbeat": time.time(), "slurm_job_id": None, "slurm_array_job_id": None,
            "slurm_array_task_id": None}
    info.update(fields)
    path.write_text(json.dumps(info))


def test_acquire_release_and_second_acquire_fails(tmp_path):
    env = {"SLURM_JOB_ID": "701", "SLURM_ARRAY_JOB_ID": "700", "SLURM_ARRAY_TASK_ID": "2"}
    first = ShardLock(tmp_path / "out", 2, 3, env=env)
    assert first.acquire()
    assert first.path.name == "_lock-2-of-3.json"
    info = json.loads(first.path.read_text())
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
    assert info["slurm_array_job_id"] == "700" and info["slurm_array_task_id"] == "2"

    second = ShardLock(tmp_path / "out", 2, 3)
    assert not second.acquire()
    description = second.holder_description()
    assert f"pid {os.getpid()}" in description and socket.gethostname() in description
    assert "Slurm job 700_2" in description

    other_shard = ShardLock(tmp_path / "out", 1, 3)
    assert other_shard.acquire()
    other_shard.release()

    first.release()
    assert not first.path.exists()
    assert second.acquire()
    second.release()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []


def test_context_manager_raises_when_held(tmp_path):
    with ShardLock(tmp_path, 0, 1) as held:
        assert held.is_held and held.path.exists()
        with pytest.raises(LockHeldError, match="held by host"):
            with ShardLock(tmp_path, 0, 1):
                pass
    assert not held.path.exists()


def test_lock_held_by_a_live_process_is_respected(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        _write_lock(tmp_path / "_lock-0-of-1.json", pid=sleeper.pid)
        lock = ShardLock(tmp_path, 0, 1)
        assert not lock.acquire()
        assert f"pid {sleeper.pid}" in lock.holder_description()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert lock.acquire()  # now its pid is dead
    lock.release()


def test_stale_by_dead_pid_is_taken_over(tmp_path):
    path = tmp_path / "_lock-0-of-2.json"
    _write_lock(path, pid=_dead_pid())
    lock = ShardLock(tmp_path, 0, 2)
    assert lock.acquire()
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()
    assert not path.exists()
    assert not list(tmp_path.iterdir())  # no claim or tmp files left behind


def test_stale_by_old_heartbeat_is_taken_over(tmp_path):
    path = tmp_path / "_lock-0-of-1.json"
    _write_lock(path, host="some-other-node", pid=1, heartbeat=time.time() - 5)
    assert not ShardLock(tmp_path, 0, 1, stale_after=60).acquire()  # fresh enough elsewhere
    lock = ShardLock(tmp_path, 0, 1, stale_after=2, heartbeat_every=1)
    assert lock.acquire()
    assert json.loads(path.read_text())["token"] != "someone-else"
    lock.release()


def test_a_requeued_slurm_task_takes_over_its_earlier_runs_lock(tmp_path):
    # The task's earlier run died with its node: fresh heartbeat, other host, same job id.
    path = tmp_path / "_lock-1-of-3.json"
    _write_lock(path, host="dead-node", pid=1, shard="1/3", slurm_job_id="901")
    other_job = {"SLURM_JOB_ID": "902", "SLURM_ARRAY_JOB_ID": "900", "SLURM_ARRAY_TASK_ID": "1"}
    assert not ShardLock(tmp_path, 1, 3, env=other_job).acquire()  # another job: a rival
    assert not ShardLock(tmp_path, 1, 3, env={}).acquire()  # outside Slurm: a rival too
    same_job = {"SLURM_JOB_ID": "901", "SLURM_ARRAY_JOB_ID": "900", "SLURM_ARRAY_TASK_ID": "1"}
    lock = ShardLock(tmp_path, 1, 3, env=same_job)
    assert lock.acquire()
    assert json.loads(path.read_text())["host"] == socket.gethostname()
    lock.release()


def test_unreadable_lock_is_held_until_old(tmp_path):
    path = tmp_path / "_lock-0-of-1.json"
    path.write_text("")  # a holder that died between create and write
    assert not ShardLock(tmp_path, 0, 1).acquire()
    old = time.time() - 600
    os.utime(path, (old, old))
    lock = ShardLock(tmp_path, 0, 1)
    assert lock.acquire()
    lock.release()


def test_heartbeat_refreshes_and_notices_a_lost_lock(tmp_path):
    lock = ShardLock(tmp_path, 0, 1, heartbeat_every=0.05, stale_after=1)
    assert lock.acquire()
    first = json.loads(lock.path.read_text())["heartbeat"]
    deadline = time.time() + 5
    while json.loads(lock.path.read_text())["heartbeat"] == first and time.time() < deadline:
        time.sleep(0.02)
    assert json.loads(lock.path.read_text())["heartbeat"] > first

    _write_lock(lock.path, token="thief")  # someone took it (e.g. after a long freeze)
    deadline = time.time() + 5
    while lock.is_held and time.time() < deadline:
        time.sleep(0.02)
    assert lock.is_lost and not lock.is_held
    lock.release()
    assert json.loads(lock.path.read_text())["token"] == "thief"  # release leaves it alone


def _race(out_dir: str, barrier, results) -> None:
    lock = ShardLock(Path(out_dir), 0, 1)
    barrier.wait()
    won = lock.acquire()
    results.put(won)
    if won:
        time.sleep(1.0)  # hold it while the losers look
        lock.release()


def test_racing_takers_of_a_stale_lock_exactly_one_wins(tmp_path):
    context = multiprocessing.get_context("spawn")
    num_racers = 6
    for _ in range(2):
        _write_lock(tmp_path / "_lock-0-of-1.json", pid=_dead_pid())
        barrier = context.Barrier(num_racers)
        results = context.Queue()
        racers = [context.Process(target=_race, args=(str(tmp_path), barrier, results))
                  for _ in range(num_racers)]
        for racer in racers:
            racer.start()
        outcomes = [results.get(timeout=60) for _ in racers]
        for racer in racers:
            racer.join(timeout=60)
            assert racer.exitcode == 0
        assert sorted(outcomes) == [False] * (num_racers - 1) + [True]
        assert not list(tmp_path.iterdir())


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="shard"):
        ShardLock(tmp_path, 2, 2)
    with pytest.raises(ValueError, match="heartbeat_every"):
        ShardLock(tmp_path, 0, 1, stale_after=5, heartbeat_every=10)


# ---- another Slurm job's lock: ask squeue -----------------------------------------------

# Stands in for squeue: logs its arguments, then answers as FAKE_SQUEUE says: a state to
# print, "gone" (squeue's answer for a job that left the queue), "hidden" (no output),
# "down" (controller unreachable) or "hang". exec: a timeout kills the sleep itself.
FAKE_SQUEUE = """#!/bin/bash
echo "$@" >> "$FAKE_SQUEUE_LOG"
case "$FAKE_SQUEUE" in
  gone) echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1 ;;
  hidden) exit 0 ;;
  down) echo "slurm_load_jobs error: Unable to contact slurm controller (connect failure)" >&2
        exit 1 ;;
  hang) exec sleep 30 ;;
  *) printf '%s\\n' $FAKE_SQUEUE ;;
esac
"""
OUR_JOB = {"SLURM_JOB_ID": "951", "SLURM_ARRAY_JOB_ID": "950", "SLURM_ARRAY_TASK_ID": "1",
           "SLURM_CLUSTER_NAME": "hpc"}


@pytest.fixture
def squeue(tmp_path, monkeypatch):
    """Puts the fake squeue first on PATH; returns (set its answer, the calls it got)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text(FAKE_SQUEUE)
    (bin_dir / "squeue").chmod(0o755)
    log = tmp_path / "squeue.log"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SQUEUE_LOG", str(log))

    def calls() -> list[str]:
        return log.read_text().splitlines() if log.exists() else []
    return (lambda answer: monkeypatch.setenv("FAKE_SQUEUE", answer)), calls


def _earlier_jobs_lock(out: Path, **fields) -> Path:
    """The lock of job 901 (task 900_1) whose node died: fresh heartbeat, another host."""
    path = out / "_lock-1-of-3.json"
    out.mkdir(exist_ok=True)
    _write_lock(path, **{"host": "dead-node", "pid": 1, "shard": "1/3", "uid": os.getuid(),
                         "slurm_job_id": "901", "slurm_array_job_id": "900",
                         "slurm_array_task_id": "1", "slurm_cluster_name": "hpc", **fields})
    return path


@pytest.mark.parametrize("answer", ["gone", "NODE_FAIL", "CANCELLED", "COMPLETED",
                                    "TIMEOUT\nFAILED"])
def test_another_jobs_lock_is_taken_at_once_when_slurm_says_that_job_is_over(
        tmp_path, squeue, answer):
    set_answer, calls = squeue
    set_answer(answer)
    path = _earlier_jobs_lock(tmp_path / "out")
    lock = ShardLock(tmp_path / "out", 1, 3, env=OUR_JOB)
    assert lock.acquire()
    info = json.loads(path.read_text())
    assert info["slurm_job_id"] == "951" and info["slurm_cluster_name"] == "hpc"
    assert info["uid"] == os.getuid()
    # the array task by name: an array's last task shares its job id with the whole array
    assert calls() == ["--noheader --jobs=900_1 --states=all --format=%T"]
    lock.release()


@pytest.mark.parametrize("answer", ["RUNNING", "PENDING", "COMPLETING", "SUSPENDED",
                                    "REQUEUED", "COMPLETED\nRUNNING"])
def test_another_jobs_lock_is_held_while_slurm_says_that_job_is_not_over(
        tmp_path, squeue, answer):
    set_answer, calls = squeue
    set_answer(answer)
    _earlier_jobs_lock(tmp_path / "out")
    lock = ShardLock(tmp_path / "out", 1, 3, env=OUR_JOB)
    assert not lock.acquire()
    assert "Slurm job 900_1" in lock.holder_description()
    assert len(calls()) == 1


@pytest.mark.parametrize("answer", ["down", "hang", "hidden", "no squeue"])
def test_when_slurm_cannot_tell_the_heartbeat_decides(tmp_path, squeue, monkeypatch, answer):
    set_answer, calls = squeue
    set_answer(answer)
    monkeypatch.setattr("batchgen.job.slurm.SQUEUE_TIMEOUT", 0.5)
    if answer == "no squeue":
        monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    out = tmp_path / "out"
    _earlier_jobs_lock(out)
    started = time.monotonic()
    assert not ShardLock(out, 1, 3, env=OUR_JOB).acquire()
    assert time.monotonic() - started < 10  # a hung squeue costs the timeout, not its sleep
    assert len(calls()) == (0 if answer == "no squeue" else 1)
    _earlier_jobs_lock(out, heartbeat=time.time() - 5)  # now its heartbeat has aged
    lock = ShardLock(out, 1, 3, env=OUR_JOB, stale_after=2, heartbeat_every=1)
    assert lock.acquire()
    lock.release()


def test_slurm_is_asked_only_about_another_job_of_our_user_on_our_cluster(tmp_path, squeue):
    set_answer, calls = squeue
    set_answer("gone")
    out = tmp_path / "out"
    # Our own job id: an earlier run of this task, taken as before without asking.
    _earlier_jobs_lock(out, slurm_job_id="951")
    lock = ShardLock(out, 1, 3, env=OUR_JOB)
    assert lock.acquire()
    lock.release()
    # Another cluster's ids, another user's job (PrivateData=jobs reads it as gone), a lock
    # of an older batchgen (no cluster or uid), or we are no Slurm job: held, not asked.
    for fields, env in [({"slurm_cluster_name": "other-hpc"}, OUR_JOB),
                        ({"uid": os.getuid() + 1}, OUR_JOB),
                        ({"slurm_cluster_name": None, "uid": None}, OUR_JOB),
                        ({}, {k: v for k, v in OUR_JOB.items() if k != "SLURM_CLUSTER_NAME"}),
                        ({}, {})]:
        _earlier_jobs_lock(out, **fields)
        assert not ShardLock(out, 1, 3, env=env).acquire(), fields
    assert calls() == []
    # A job outside any array is named by its job id.
    _earlier_jobs_lock(out, slurm_array_job_id=None, slurm_array_task_id=None)
    lock = ShardLock(out, 1, 3, env=OUR_JOB)
    assert lock.acquire()
    lock.release()
    assert calls() == ["--noheader --jobs=901 --states=all --format=%T"]


def test_the_heartbeat_outlives_a_failed_refresh(tmp_path):
    """A refresh that fails once (quota, a shared filesystem's blip) must not end the
    heartbeat: the lock would age into another run's hands while this one goes on."""
    lock = ShardLock(tmp_path, 0, 1, heartbeat_every=0.05, stale_after=1.0)
    assert lock.acquire()
    blocker = lock._tmp_path()
    blocker.mkdir()  # the next refresh cannot write its temp file
    time.sleep(0.3)
    blocker.rmdir()
    time.sleep(0.5)
    assert time.time() - json.loads(lock.path.read_text())["heartbeat"] < 0.5
    assert lock.is_held
    lock.release()
    assert not lock.path.exists()


def test_shards_overlap_when_some_part_is_in_both():
    from batchgen.job.lock import shards_overlap
    for n, m in [(1, 8), (2, 8), (4, 6), (3, 5)]:
        for i in range(n):
            for j in range(m):
                expected = any(p % n == i and p % m == j for p in range(n * m))
                assert shards_overlap(i, n, j, m) == expected, (i, n, j, m)
