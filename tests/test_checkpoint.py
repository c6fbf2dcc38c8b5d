"""Fingerprints, resume planning, and status / verify on complete, partial, tampered folders."""
import dataclasses
import json
import os

import pytest

from batchgen.job import checkpoint as ckpt
from batchgen.job import overwrite
from batchgen.job.config import JobConfig
from batchgen.job.fingerprint import fingerprint, fingerprint_fields
from batchgen.job.prepare import prepare_job
from batchgen.job.progress import ProgressReporter, print_verify
from batchgen.job.runner import run_job
from batchgen.job.status import job_status
from batchgen.job.verification import verify_job
from fake_engine import fake_engine_factory


def make_job(tmp_path, n=10, **kw):
    src = tmp_path / "in.jsonl"
    if not src.exists():
        src.write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(n)))
    kw.setdefault("rows_per_part", 3)
    return JobConfig(input=str(src), output_dir=tmp_path / "out", **kw)


def run(job):
    return run_job(job, make_engine=fake_engine_factory(), reporter=ProgressReporter(enabled=False))


def test_fingerprint_ignores_limit_and_shards_but_not_prompt_or_sampling(tmp_path):
    model = {"m": 1}
    ident = {"path": "x"}
    base = fingerprint(fingerprint_fields(make_job(tmp_path), model, ident))
    same = [make_job(tmp_path, limit=4), make_job(tmp_path, shard_index=1, num_shards=2),
            make_job(tmp_path, max_num_seqs=3)]
    for job in same:
        assert fingerprint(fingerprint_fields(job, model, ident)) == base
    different = [make_job(tmp_path, system="s"), make_job(tmp_path, sampling={"temperature": 0.5}),
                 make_job(tmp_path, seed=1), make_job(tmp_path, rows_per_part=4),
                 make_job(tmp_path, format="jsonl")]
    for job in different:
        assert fingerprint(fingerprint_fields(job, model, ident)) != base
    assert fingerprint(fingerprint_fields(make_job(tmp_path), model, {"path": "y"})) != base


def test_job_file_is_written_once_and_compared(tmp_path):
    record = ckpt.JobRecord("aaaa", {"x": 1}, 3, "parquet", 10)
    assert ckpt.open_job(tmp_path, record).fingerprint == "aaaa"
    assert ckpt.open_job(tmp_path, ckpt.JobRecord("aaaa", {"x": 1}, 3, "parquet", 10)).fingerprint == "aaaa"
    with pytest.raises(ckpt.JobMismatchError, match="changed: x"):
        ckpt.open_job(tmp_path, ckpt.JobRecord("bbbb", {"x": 2}, 3, "parquet", 10))
    (tmp_path / "part-00000.parquet").write_bytes(b"old")
    other = ckpt.JobRecord("bbbb", {"x": 2}, 3, "parquet", 10)
    overwrite.clear_for_overwrite(tmp_path, other)
    assert not (tmp_path / "part-00000.parquet").exists()
    assert not (tmp_path / "_job.json").exists()  # the new record waits for its engine
    ckpt.open_job(tmp_path, other)
    assert json.loads((tmp_path / "_job.json").read_text())["fingerprint"] == "bbbb"


def test_overwrite_deletes_nothing_while_another_run_holds_any_shard(tmp_path):
    from batchgen.job.lock import ShardLock
    ckpt.open_job(tmp_path, ckpt.JobRecord("aaaa", {"x": 1}, 3, "parquet", 10))
    (tmp_path / "part-00000.parquet").write_bytes(b"old")
    other = ckpt.JobRecord("bbbb", {"x": 2}, 3, "parquet", 10)
    with ShardLock(tmp_path, 1, 2):  # a live run of another shard, of another split
        with pytest.raises(ckpt.JobConfigError, match="in use by another run .shard 1/2 held"):
            overwrite.clear_for_overwrite(tmp_path, other, own_lock=tmp_path / "_lock-0-of-1.json")
    assert (tmp_path / "part-00000.parquet").exists()
    assert json.loads((tmp_path / "_job.json").read_text())["fingerprint"] == "aaaa"
    overwrite.clear_for_overwrite(tmp_path, other)  # released: now it may
    assert not (tmp_path / "part-00000.parquet").exists()


def test_an_unwritable_output_folder_is_a_config_error(tmp_path):
    (tmp_path / "afile").write_text("")
    with pytest.raises(ckpt.JobConfigError,
                       match="^cannot write to output .*afile/sub: Not a directory$"):
        ckpt.open_job(tmp_path / "afile" / "sub", ckpt.JobRecord("aaaa", {}, 3, "parquet", 10))


def test_status_and_verify_on_a_complete_job(tmp_path, capsys):
    run(make_job(tmp_path))
    status = job_status(tmp_path / "out")
    assert (status.num_parts_committed, status.num_parts_total) == (4, 4)
    assert (status.num_rows_done, status.num_rows_total, status.num_errors) == (10, 10, 0)
    assert status.is_complete and status.rows_per_s > 0
    assert verify_job(tmp_path / "out").is_ok
    assert print_verify(tmp_path / "out") == 0


def test_status_and_verify_on_a_partial_job(tmp_path):
    run(make_job(tmp_path, limit=5))
    status = job_status(tmp_path / "out")
    assert (status.num_parts_committed, status.num_rows_done, status.num_rows_total) == (2, 5, 10)
    assert not status.is_complete
    report = verify_job(tmp_path / "out")
    assert not report.problems
    assert report.gaps == ["rows 5..5 (part-00001.parquet is short)",
                           "parts 2..3 missing (rows 6..9)"]
    assert print_verify(tmp_path / "out") == 1


def test_verify_finds_tampered_parts(tmp_path):
    run(make_job(tmp_path, format="jsonl"))
    out = tmp_path / "out"
    part1 = out / "part-00001.jsonl"
    lines = part1.read_text().splitlines()
    part1.write_text("\n".join([lines[0], lines[0], lines[2]]) + "\n")  # a duplicated row
    (out / "part-00002.jsonl").write_text("{truncated")  # unreadable
    os.unlink(out / "part-00003.jsonl")  # missing
    report = verify_job(out)
    assert any("part-00001.jsonl: duplicate rows" in p for p in report.problems)
    assert any("part-00002.jsonl: unreadable" in p for p in report.problems)
    assert report.gaps == ["part 3 missing (rows 9..9)"]
    # a resumed run redoes the missing part and the unreadable short one
    assert run(make_job(tmp_path, format="jsonl")).num_rows == 4
    assert verify_job(out).problems == ["part-00001.jsonl: duplicate rows"]


def test_a_damaged_jsonl_line_gets_its_part_redone(tmp_path):
    """The part keeps its line count, so counting lines would take it for done while verify
    calls it unreadable."""
    run(make_job(tmp_path, format="jsonl"))
    part = tmp_path / "out" / "part-00001.jsonl"
    lines = part.read_text().splitlines()
    part.write_text("\n".join([lines[0], lines[1][:15], lines[2]]) + "\n")
    assert verify_job(tmp_path / "out").problems
    again = run(make_job(tmp_path, format="jsonl"))
    assert again.exit_code == 0 and again.num_rows == 3
    assert verify_job(tmp_path / "out").is_ok


def test_plan_selection_resumes_a_short_part(tmp_path):
    run(make_job(tmp_path, limit=4))
    record = ckpt.load_record(tmp_path / "out")
    sel = ckpt.plan_selection(tmp_path / "out", record, shard_index=0, num_shards=1, limit=None)
    assert sel.done_parts == {0} and sel.resume_from == {1: 4} and sel.stop == 10
    assert [r for r in range(10) if sel.contains(r)] == [4, 5, 6, 7, 8, 9]


def test_a_resumed_run_scans_its_parts_and_the_shard_files_once(tmp_path, monkeypatch):
    """plan_selection's result carries the rows committed and the input's length, so the
    run's tally neither counts the parts nor reads the shard files again."""
    run(make_job(tmp_path, limit=4))  # parts 0 (3 rows) and 1 (1 row)
    counted, scans = [], []
    count_part_rows, known_num_input_rows = ckpt.count_part_rows, ckpt.known_num_input_rows
    monkeypatch.setattr(ckpt, "count_part_rows",
                        lambda path: counted.append(path.name) or count_part_rows(path))
    monkeypatch.setattr(ckpt, "known_num_input_rows",
                        lambda *a: scans.append(a) or known_num_input_rows(*a))
    metrics = run(make_job(tmp_path))
    assert sorted(counted) == ["part-00000.parquet", "part-00001.parquet"] and len(scans) == 1
    assert metrics.num_rows_done_before == 4 and metrics.num_rows == 6


def test_int_and_float_sampling_values_are_one_job(tmp_path):
    model, ident = {"m": 1}, {"path": "x"}
    as_int = make_job(tmp_path, sampling={"temperature": 0, "top_p": 1, "max_tokens": 3})
    as_float = make_job(tmp_path, sampling={"temperature": 0.0, "top_p": 1.0, "max_tokens": 3})
    fields = fingerprint_fields(as_int, model, ident)
    assert fingerprint(fields) == fingerprint(fingerprint_fields(as_float, model, ident))
    # a folder written before numbers were normalised is still the same job...
    legacy = dict(fields, sampling={"temperature": 0, "top_p": 1, "max_tokens": 3})
    ckpt.open_job(tmp_path, ckpt.JobRecord(fingerprint(legacy), legacy, 3, "parquet", 10))
    new = ckpt.JobRecord(fingerprint(fields), fields, 3, "parquet", 10)
    assert ckpt.existing_job(tmp_path, new) is not None and not ckpt.holds_other_job(tmp_path, new)
    # ...and a real change is named, not reported as "format"
    changed = dict(fields, seed=7)
    with pytest.raises(ckpt.JobMismatchError, match=r"changed: seed\)"):
        ckpt.existing_job(tmp_path, ckpt.JobRecord(fingerprint(changed), changed, 3, "parquet", 10))


def test_overwrite_puts_the_old_job_back_unless_the_new_one_starts(tmp_path):
    ckpt.open_job(tmp_path, ckpt.JobRecord("aaaa", {"x": 1}, 3, "parquet", 10))
    (tmp_path / "part-00000.parquet").write_bytes(b"old")
    other = ckpt.JobRecord("bbbb", {"x": 2}, 3, "parquet", 10)
    overwrite.clear_for_overwrite(tmp_path, other)
    assert not (tmp_path / "part-00000.parquet").exists()
    overwrite.finish_overwrite(tmp_path)  # the new job never started (e.g. its engine refused)
    assert (tmp_path / "part-00000.parquet").read_bytes() == b"old"
    assert json.loads((tmp_path / "_job.json").read_text())["fingerprint"] == "aaaa"
    assert not (tmp_path / overwrite.OVERWRITTEN_DIR).exists()
    overwrite.clear_for_overwrite(tmp_path, other)
    ckpt.open_job(tmp_path, other)  # the new job started: the old one is gone for good
    overwrite.finish_overwrite(tmp_path)
    assert not (tmp_path / overwrite.OVERWRITTEN_DIR).exists()
    assert not (tmp_path / "part-00000.parquet").exists()


def _write_input(path, prompts):
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        # uncompressed, plain: the same size after a same-length edit
        pq.write_table(pa.table({"prompt": prompts}), path, compression="none",
                       use_dictionary=False)
    else:
        path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))


@pytest.mark.parametrize("name", ["in.jsonl", "in.parquet"])
def test_resume_on_an_input_changed_in_place_to_the_same_size_is_refused(tmp_path, name):
    """Rows rewritten past the first MiB, keeping the file's size and row count (a relabelled
    dataset written again): resuming would mix the old file's parts with the new file's."""
    src = tmp_path / name
    prompts = [f"p{i:07d}-" + "x" * 100 for i in range(12_000)]  # > 1 MiB of JSONL
    _write_input(src, prompts)
    job = JobConfig(input=str(src), output_dir=tmp_path / "out", rows_per_part=5000, limit=5000)
    assert run(job).exit_code == 0
    _write_input(src, prompts)  # the same rows again: the same job, resumed
    assert ckpt.existing_job(job.output_dir, prepare_job(job).record) is not None
    size = src.stat().st_size
    _write_input(src, prompts[:11_000] + [p.replace("p", "q") for p in prompts[11_000:]])
    assert src.stat().st_size == size
    with pytest.raises(ckpt.JobMismatchError, match="changed: input"):
        run(dataclasses.replace(job, limit=None))
