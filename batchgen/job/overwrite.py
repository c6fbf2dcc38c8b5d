"""--overwrite in steps that a kill at any moment (kill -9, a lost node) cannot turn into a
lost or a mixed job.

The old job is set aside in `_overwritten/`, not deleted: first `_new_job.json` (the record
of the job it makes room for), then its parts and bookkeeping, its `_job.json` last. The new
job's first run whose engine starts writes its own `_job.json` and `discard`s the old one; a
run or launch that never got that far (a setting the engine refused, a stop) puts it back:
`finish_overwrite`. What a run killed in between leaves is settled by the next run, before it
reads the folder (`recover`):

- the old record set aside and none in the folder: the new job has not started. A run of the
  new job (a task after `batchgen slurm --overwrite`, the same command again) goes on and
  finishes the overwrite; any other run puts the old job back, then resumes it (or refuses a
  different job, as ever).
- a record in both, different ones: the new job has started: the old one is discarded.
- otherwise (the old record still, or again, in the folder: a set-aside or a put-back cut
  short): the rest of the old job is put back.

Nothing is put back while another live run holds a lock in the folder (it may be the run
moving files), and the old record goes back first, only into a folder with no record: a new
job that started meanwhile keeps the folder and nothing of the old one lands beside it.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from batchgen.job.checkpoint import (JOB_FILE, JobRecord, holds_other_job, is_same_job,
                                     job_files, read_json, writing_to)
from batchgen.job.config import JobConfigError
from batchgen.job.lock import live_lock_holders
from batchgen.job.writer import write_json_atomic

OVERWRITTEN_DIR = "_overwritten"
NEW_JOB_FILE = "_new_job.json"  # in OVERWRITTEN_DIR: the record of the job it waits for
_TRASH_DIR = "_overwritten.deleting"  # `discard` renames the old job here, then deletes it


def clear_for_overwrite(out_dir: Path, record: JobRecord, *, own_lock: Path | None = None) -> None:
    """--overwrite: set another job's parts and bookkeeping aside for `record`'s job, unless a
    live run (other than ours, holding `own_lock`) has a lock on any shard of the folder:
    clearing under it would leave it committing its parts into a folder labelled as our job."""
    recover(out_dir, record, own_lock=own_lock)  # what a killed run left: whole before it moves
    if not holds_other_job(out_dir, record):
        return
    holders = live_lock_holders(out_dir, exclude=own_lock)
    if holders:
        raise JobConfigError(f"--overwrite: {out_dir} is in use by another run ({holders[0]}); "
                             "stop it first, or use another --output")
    aside = out_dir / OVERWRITTEN_DIR
    with writing_to(out_dir):
        aside.mkdir()
        write_json_atomic(aside / NEW_JOB_FILE, record.__dict__)
        for path in sorted(job_files(out_dir), key=lambda p: p.name == JOB_FILE):
            os.replace(path, aside / path.name)


def clear_or_recover(out_dir: Path, record: JobRecord, *, is_overwrite: bool,
                     own_lock: Path | None = None) -> str | None:
    """Before a run (or a launch) of `record`'s job reads the folder: --overwrite sets another
    job aside; without it, what a killed --overwrite left is settled. Returns a line saying
    what was put back, or None."""
    if is_overwrite:
        clear_for_overwrite(out_dir, record, own_lock=own_lock)
        return None
    return recover(out_dir, record, own_lock=own_lock)


def recover(out_dir: Path, record: JobRecord, *, own_lock: Path | None = None) -> str | None:
    """Before a run of `record`'s job reads the folder (under its lock, `own_lock`): settle what
    an --overwrite killed midway left (see the module docstring). Returns a line saying what
    was put back, or None. An old job waiting for another job while a live run holds the
    folder (it may be that job starting) is refused: JobConfigError."""
    aside = out_dir / OVERWRITTEN_DIR
    if (aside / JOB_FILE).exists() and not (out_dir / JOB_FILE).exists():
        waits_for = read_json(aside / NEW_JOB_FILE)
        if waits_for is not None and is_same_job(waits_for, record):
            return None  # this run is that job: its start finishes the overwrite
        holders = live_lock_holders(out_dir, exclude=own_lock)
        if holders:
            raise JobConfigError(
                f"{out_dir}: the job an unfinished --overwrite set aside in {OVERWRITTEN_DIR}/ "
                f"waits for another job, and a run is using the folder ({holders[0]}); re-run "
                "once it has ended (the old job is then put back), or use another --output")
    if not finish_overwrite(out_dir, own_lock=own_lock):
        return None
    return f"batchgen: {out_dir}: put back the job a killed --overwrite had set aside"


def finish_overwrite(out_dir: Path, *, own_lock: Path | None = None) -> bool:
    """After an --overwrite run or launch: if the new job started, the old one is discarded;
    if not (a setting the engine refused, a stop, a failure), it is put back, so a refused
    command loses nothing. Nothing is put back while another live run holds a lock in the
    folder: its start, or the next run's `recover`, settles it. Returns whether anything was."""
    aside = out_dir / OVERWRITTEN_DIR
    old, current = aside / JOB_FILE, out_dir / JOB_FILE
    with writing_to(out_dir):
        shutil.rmtree(out_dir / _TRASH_DIR, ignore_errors=True)
        if not aside.is_dir():
            return False
        if old.exists() and current.exists() and old.read_bytes() != current.read_bytes():
            discard(out_dir)
            return False
        if not (old.exists() or current.exists()) or live_lock_holders(out_dir, exclude=own_lock):
            return False  # no record says whose parts these are; or another run may be moving
        return _put_back(out_dir)


def _put_back(out_dir: Path) -> bool:
    aside = out_dir / OVERWRITTEN_DIR
    old, current = aside / JOB_FILE, out_dir / JOB_FILE
    if old.exists():
        try:
            os.link(old, current)  # first, and only if no new job's record got there first
        except FileExistsError:
            if current.read_bytes() != old.read_bytes():
                discard(out_dir)
                return False
    for path in aside.iterdir():
        if path.name not in (JOB_FILE, NEW_JOB_FILE) and not (out_dir / path.name).exists():
            os.replace(path, out_dir / path.name)
    discard(out_dir)
    return True


def discard(out_dir: Path) -> None:
    """Delete the old job set aside, renamed out of the way first: a kill while deleting
    leaves it whole or gone, never a remnant that would read as a cut-short set-aside."""
    trash = out_dir / _TRASH_DIR
    with writing_to(out_dir):
        shutil.rmtree(trash, ignore_errors=True)
        try:
            os.rename(out_dir / OVERWRITTEN_DIR, trash)
        except FileNotFoundError:
            return
        shutil.rmtree(trash, ignore_errors=True)
