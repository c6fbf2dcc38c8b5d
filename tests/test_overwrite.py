"""--overwrite killed midway (kill -9: no finally ran): the on-disk states it can leave are
made directly, and the next run must neither lose the old job nor mix it into the new one."""
import json
import os

import pytest

from batchgen.job import overwrite
from batchgen.job.config import JobConfig, JobConfigError
from batchgen.job.lock import ShardLock
from batchgen.job.progress import ProgressReporter
from batchgen.job.runner import prepare_job, run_job
from batchgen.job.writer import list_parts
from fake_engine import fake_engine_factory

ASIDE = overwrite.OVERWRITTEN_DIR


@pytest.fixture
def jobs(tmp_path):
    """Job `old` done in `out` (4 parts); `new` (what the killed --overwrite ran) and `other`
    differ from it in max_tokens only."""
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(10)))
    def job(max_tokens, **kw):
        return JobConfig(input=str(src), output_dir=tmp_path / "out", rows_per_part=3,
                         format="jsonl", sampling={"max_tokens": max_tokens}, **kw)
    jobs = {"old": job(8), "new": job(3), "other": job(5)}
    assert run(jobs["old"]).num_rows == 10
    return jobs


def run(job, make_engine=None):
    return run_job(job, make_engine=make_engine or fake_engine_factory(),
                   reporter=ProgressReporter(enabled=False))


def files(out):
    """The job's record and parts (not the locks, nor the per-run shard counters)."""
    return {p.name: p.read_bytes() for p in out.iterdir()
            if p.is_file() and not p.name.startswith(("_lock", "_shard"))}


def killed_after_set_aside(job):
    """The state an --overwrite run leaves when killed while its engine was starting."""
    overwrite.clear_for_overwrite(job.output_dir, prepare_job(job).record)


def refusing_engine(job):
    raise ValueError("max_model_len=999999 is longer than the model's")


def test_a_plain_rerun_puts_the_set_aside_job_back(jobs):
    out = jobs["old"].output_dir
    before = files(out)
    killed_after_set_aside(jobs["new"])
    assert not list_parts(out) and (out / ASIDE).is_dir()
    again = run(jobs["old"])  # the old job, as before the --overwrite: resumed, not redone
    assert again.exit_code == 0 and again.num_rows == 0
    assert not (out / ASIDE).exists() and files(out) == before


def test_another_job_is_refused_and_the_old_one_is_back(jobs):
    out = jobs["old"].output_dir
    killed_after_set_aside(jobs["new"])
    with pytest.raises(JobConfigError, match="holds a different job .* --overwrite"):
        run(jobs["other"])
    assert sorted(list_parts(out)) == [0, 1, 2, 3] and not (out / ASIDE).exists()
    assert json.loads((out / "_job.json").read_text())["fields"]["sampling"] == {"max_tokens": 8}


def test_the_job_it_waits_for_finishes_the_overwrite(jobs):
    """A Slurm task after `batchgen slurm --overwrite` (or the same command without the
    flag): the old job waits for this one, which replaces it."""
    out = jobs["old"].output_dir
    killed_after_set_aside(jobs["new"])
    assert run(jobs["new"]).num_rows == 10
    assert not (out / ASIDE).exists()
    assert json.loads((out / "_job.json").read_text())["fields"]["sampling"] == {"max_tokens": 3}


def test_a_rerun_with_overwrite_replaces_it_or_loses_nothing_if_refused(jobs):
    out = jobs["old"].output_dir
    before = files(out)
    killed_after_set_aside(jobs["new"])
    other = JobConfig(**{**jobs["other"].__dict__, "overwrite": True})
    with pytest.raises(JobConfigError, match="cannot start the engine"):
        run(other, make_engine=refusing_engine)
    assert sorted(list_parts(out)) == [0, 1, 2, 3] and not (out / ASIDE).exists()
    assert run(other).num_rows == 10 and not (out / ASIDE).exists()
    assert files(out)["_job.json"] != before["_job.json"]


def _cut_short_set_aside(out, new_record):
    """Killed while moving: the marker and parts 0 and 1 moved, the old record still in place."""
    (out / ASIDE).mkdir()
    (out / ASIDE / overwrite.NEW_JOB_FILE).write_text(json.dumps(new_record.__dict__))
    for part in (0, 1):
        path = list_parts(out)[part]
        os.replace(path, out / ASIDE / path.name)


def _cut_short_put_back(out, new_record):
    """Killed while putting back: the old record linked back, parts 2 and 3 still aside."""
    (out / ASIDE).mkdir()
    (out / ASIDE / overwrite.NEW_JOB_FILE).write_text(json.dumps(new_record.__dict__))
    os.link(out / "_job.json", out / ASIDE / "_job.json")
    for part in (2, 3):
        path = list_parts(out)[part]
        os.replace(path, out / ASIDE / path.name)


@pytest.mark.parametrize("cut_short", [_cut_short_set_aside, _cut_short_put_back])
def test_a_cut_short_move_is_completed_back(jobs, cut_short):
    out = jobs["old"].output_dir
    before = files(out)
    cut_short(out, prepare_job(jobs["new"]).record)
    assert len(list_parts(out)) == 2
    again = run(jobs["old"])
    assert again.num_rows == 0  # every part back: nothing redone
    assert not (out / ASIDE).exists() and files(out) == before


def test_a_cut_short_set_aside_is_whole_again_when_the_overwrite_is_refused(jobs):
    """Before, a later --overwrite deleted what the killed one had moved, so a refused engine
    could put back only the rest."""
    out = jobs["old"].output_dir
    _cut_short_set_aside(out, prepare_job(jobs["new"]).record)
    with pytest.raises(JobConfigError, match="cannot start the engine"):
        run(JobConfig(**{**jobs["new"].__dict__, "overwrite": True}), make_engine=refusing_engine)
    assert sorted(list_parts(out)) == [0, 1, 2, 3] and not (out / ASIDE).exists()


def test_leftovers_of_a_started_new_job_are_deleted(jobs):
    """Killed after the new job wrote its record, while it deleted the old one (and an
    earlier discard's trash)."""
    out = jobs["old"].output_dir
    killed_after_set_aside(jobs["new"])
    (out / "_overwritten.deleting").mkdir()
    (out / "_job.json").write_text(json.dumps(prepare_job(jobs["new"]).record.__dict__))
    (out / ASIDE / "part-00000.jsonl").unlink()
    assert run(jobs["new"]).num_rows == 10
    assert not (out / ASIDE).exists() and not (out / "_overwritten.deleting").exists()
    rows = [json.loads(line) for line in list_parts(out)[0].read_text().splitlines()]
    assert [r["row"] for r in rows] == [0, 1, 2]


def test_nothing_is_put_back_under_another_live_run(jobs):
    """The old job waits for another job while a run holds the folder: that may be the new
    job starting, so nothing moves and this run is refused."""
    out = jobs["old"].output_dir
    killed_after_set_aside(jobs["new"])
    with ShardLock(out, 1, 2):  # (a run of shard 0/1 would give way to it: they share parts)
        with pytest.raises(JobConfigError, match="unfinished --overwrite .* re-run once"):
            run(JobConfig(**{**jobs["old"].__dict__, "num_shards": 2}))
        assert not list_parts(out) and (out / ASIDE / "_job.json").exists()
    assert run(jobs["old"]).num_rows == 0  # that run ended: the old job is back, done


def test_a_task_with_no_parts_leaves_the_set_aside_job_waiting(jobs):
    """`batchgen slurm --overwrite --array 8` on a 4-part job: tasks 4..7 have no part. Such
    a task must not record the new job (which discards the old one) when no engine has
    started: if the tasks with parts then find settings the engine refuses, the old job
    would be lost, where a refused command is to lose nothing."""
    out = jobs["old"].output_dir
    before = files(out)
    killed_after_set_aside(jobs["new"])  # what `batchgen slurm --overwrite` leaves
    task = lambda i: JobConfig(**{**jobs["new"].__dict__, "shard_index": i,  # noqa: E731
                                  "num_shards": 8})
    assert run(task(6)).status == "nothing to do"
    with pytest.raises(JobConfigError, match="cannot start the engine"):
        run(task(0), make_engine=refusing_engine)
    assert (out / ASIDE / "_job.json").exists() and not (out / "_job.json").exists()
    assert run(jobs["old"]).num_rows == 0  # put back whole: nothing to redo
    assert files(out) == before
