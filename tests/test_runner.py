"""run_job on the fast fake engine: bad rows, resume, seeds, windows, OpenAI batch, shards,
and a 1,000,000-row Parquet input streamed with flat memory."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchgen.job.config import JobConfig, JobConfigError
from batchgen.job.progress import ProgressReporter
from batchgen.job.runner import EXIT_INTERRUPTED, row_seed, run_job
from batchgen.job.writer import list_parts, read_part
from fake_engine import FakeLLM, fake_engine_factory

QUIET = ProgressReporter(enabled=False)


def write_jsonl(path: Path, prompts) -> Path:
    with open(path, "w") as f:
        for p in prompts:
            f.write(json.dumps({"prompt": p, "n": len(p)}) + "\n")
    return path


def rows_of(out: Path) -> list[dict]:
    parts = list_parts(out)
    return [r for p in sorted(parts) for r in read_part(parts[p])]


def run(job: JobConfig, **engine_kwargs):
    return run_job(job, make_engine=fake_engine_factory(**engine_kwargs), reporter=QUIET)


BAD_LINES = [
    b"{not json",                                    # malformed JSON
    b"",                                             # blank line
    b"   \t ",                                       # whitespace-only line
    b'{"prompt": "\xff\xfe bad bytes"}',             # undecodable bytes
    b'{"other": "no prompt here"}',                  # missing field
    b'{"prompt": null}',                             # null field
    b'{"prompt": 42}',                               # non-string field
    b'{"prompt": ["a", "list"]}',                    # non-string field (list)
    b'{"prompt": ""}',                               # empty prompt
    b'{"prompt": "   "}',                            # whitespace-only prompt
    b'[1, 2, 3]',                                    # JSON, not an object
    b'"a string"',                                   # JSON, not an object
    json.dumps({"prompt": "x" * 600}).encode(),      # longer than the model allows (512)
]


def signalling_engine(signum: int, *, at_step: int, max_num_seqs: int):
    """make_engine for run_job: a FakeLLM whose engine sends this process `signum` as it
    starts step `at_step`."""
    def make_engine(job):
        llm = FakeLLM(max_num_seqs=max_num_seqs)
        step = llm.engine.step

        def signal_then_step():
            if llm.engine.num_steps == at_step:
                os.kill(os.getpid(), signum)
            return step()
        llm.engine.step = signal_then_step
        return llm
    return make_engine


def test_bad_rows_never_stop_the_job(tmp_path):
    lines = []
    for i, bad in enumerate(BAD_LINES):
        lines += [json.dumps({"prompt": f"good {i}"}).encode(), bad]
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    job = JobConfig(input=str(tmp_path / "in.jsonl"), output_dir=tmp_path / "out", rows_per_part=5,
                    format="jsonl")
    metrics = run(job, max_model_len=512)
    assert metrics.exit_code == 0
    rows = rows_of(tmp_path / "out")
    assert [r["row"] for r in rows] == list(range(2 * len(BAD_LINES)))
    for r in rows:
        if r["row"] % 2 == 0:
            assert r["error"] is None and r["text"].startswith("echo[") and r["output_tokens"] > 0
        else:
            assert r["error"] and r["text"] is None and r["finish_reason"] == "error"
    assert metrics.num_errors == len(BAD_LINES)
    assert len(metrics.errors_by_kind) >= 8
    assert "prompt too long" in rows[-1]["error"]


def test_token_ids_the_model_lacks_are_error_rows(tmp_path):
    """A tokenizer larger than the model's vocabulary (a --tokenizer of another model): the
    engine refuses such a prompt's ids; that row gets the error and the job goes on."""
    src = write_jsonl(tmp_path / "in.jsonl", ["ABC", "abc", "XYZ"])
    job = JobConfig(input=str(src), output_dir=tmp_path / "out", chat=False, format="jsonl")
    metrics = run(job, vocab_size=100)  # FakeTokenizer's ids are a byte + 3: "a" is id 100
    assert metrics.exit_code == 0 and metrics.errors_by_kind == {"outside the vocabulary": 1}
    assert [r["error"] is None for r in rows_of(tmp_path / "out")] == [True, False, True]


def test_resume_after_a_stop_signal_equals_an_uninterrupted_run(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [f"prompt number {i}" for i in range(40)])
    kw = dict(input=str(src), rows_per_part=3, format="jsonl", sampling={"temperature": 0.8},
              seed=7)
    whole = run(JobConfig(output_dir=tmp_path / "whole", **kw), max_num_seqs=4)
    assert whole.exit_code == 0

    class SignalAfter:
        def __init__(self, steps):
            self.steps = steps

        def __call__(self, job):
            llm = FakeLLM(max_num_seqs=4)
            step = llm.engine.step
            def step_then_signal():
                self.steps -= 1
                if self.steps == 0:
                    os.kill(os.getpid(), signal.SIGUSR1)
                return step()
            llm.engine.step = step_then_signal
            return llm

    out = tmp_path / "resumed"
    first = run_job(JobConfig(output_dir=out, **kw), make_engine=SignalAfter(3), reporter=QUIET)
    assert first.exit_code == EXIT_INTERRUPTED
    assert 0 < len(list_parts(out)) < 14
    second = run(JobConfig(output_dir=out, **kw), max_num_seqs=4)
    assert second.exit_code == 0 and second.num_rows_done_before > 0
    assert rows_of(out) == rows_of(tmp_path / "whole")
    assert f"seed={row_seed(7, 5) % 100000}" in rows_of(out)[5]["text"]
    assert run(JobConfig(output_dir=out, **kw)).status == "nothing to do"


def test_window_bounds_the_engine_and_order_is_restored(tmp_path):
    prompts = [("long shared prefix " * (i % 3)) + f"#{i}" for i in range(200)]
    src = write_jsonl(tmp_path / "in.jsonl", prompts)
    made = []
    job = JobConfig(input=str(src), output_dir=tmp_path / "out", rows_per_part=16, format="jsonl",
                    sampling={"temperature": 0}, chat=False)
    run_job(job, make_engine=fake_engine_factory(made, max_num_seqs=4, record_admissions=True), reporter=QUIET)
    engine = made[0].engine
    assert engine.max_in_engine <= 8  # window = 2 * max_num_seqs
    order = [int(r) for r in engine.admission_order]
    assert order != sorted(order)  # reordered within windows...
    assert all(abs(a - i) < 8 for i, a in enumerate(order))  # ...but never beyond one window
    rows = rows_of(tmp_path / "out")
    assert [r["row"] for r in rows] == list(range(200))
    assert all(prompts[r["row"]][-4:] in r["text"] for r in rows)


def test_each_window_admits_the_longest_outputs_first(tmp_path):
    caps = [3, 40, 7, 40, 12, 5, 3, 25, 9, 40, 6, 18]
    src = tmp_path / "batch.jsonl"
    src.write_text("".join(json.dumps({
        "custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
        "body": {"prompt": f"p{i}", "max_tokens": cap, "temperature": 0}}) + "\n"
        for i, cap in enumerate(caps)))
    made = []
    job = JobConfig(input=str(src), output_dir=tmp_path / "out", rows_per_part=4)
    assert run_job(job, make_engine=fake_engine_factory(made, max_num_seqs=3,
                                                         record_admissions=True),
                   reporter=QUIET).exit_code == 0
    order = [int(r) for r in made[0].engine.admission_order]
    assert sorted(order) == list(range(12))
    windows = [order[i:i + 6] for i in range(0, 12, 6)]  # window = 2 * max_num_seqs
    for window in windows:  # the tied 40s: their prompts "p1" < "p3" sort as their rows
        assert window == sorted(window, key=lambda i: (-caps[i], i)), window
    assert [o["custom_id"] for o in rows_of(tmp_path / "out")] == [f"r{i}" for i in range(12)]


def test_limit_then_a_run_without_it_continues_the_same_job(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [f"p{i}" for i in range(25)])
    kw = dict(input=str(src), output_dir=tmp_path / "out", rows_per_part=10, format="parquet",
              sampling={"temperature": 0})
    assert run(JobConfig(limit=13, **kw)).num_rows == 13
    assert sorted(list_parts(tmp_path / "out")) == [0, 1]  # part 1 is short: rows 10..12
    again = run(JobConfig(**kw))
    assert again.num_rows == 12 and again.exit_code == 0  # rows 13..24 only
    assert [r["row"] for r in rows_of(tmp_path / "out")] == list(range(25))


def test_a_changed_job_is_refused_unless_overwrite(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [f"p{i}" for i in range(5)])
    kw = dict(input=str(src), output_dir=tmp_path / "out", rows_per_part=2)
    run(JobConfig(**kw, sampling={"max_tokens": 5}))
    with pytest.raises(JobConfigError, match="different job.*sampling"):
        run(JobConfig(**kw, sampling={"max_tokens": 6}))
    metrics = run(JobConfig(**kw, sampling={"max_tokens": 6}, overwrite=True))
    assert metrics.exit_code == 0 and metrics.num_rows == 5


def test_shards_are_disjoint_and_together_complete(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [f"p{i}" for i in range(23)])
    for i in range(3):
        job = JobConfig(input=str(src), output_dir=tmp_path / "out", rows_per_part=4,
                        shard_index=i, num_shards=3, format="jsonl")
        assert run(job).exit_code == 0
        assert all(p % 3 <= i for p in list_parts(tmp_path / "out"))
    assert [r["row"] for r in rows_of(tmp_path / "out")] == list(range(23))
    assert sorted(os.listdir(tmp_path / "out"))[:4] == ["_job.json", "_shard-0-of-3.json",
                                                        "_shard-1-of-3.json", "_shard-2-of-3.json"]


def test_openai_batch_in_gives_openai_batch_out(tmp_path):
    lines = [
        {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}},
        {"custom_id": "b", "method": "POST", "url": "/v1/completions",
         "body": {"model": "m", "prompt": "once upon", "temperature": 0}},
        {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
         "body": {"messages": [{"role": "user", "content": "dup"}]}},
        {"custom_id": "c", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}},
        {"custom_id": "d", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": []}},
    ]
    src = tmp_path / "batch.jsonl"
    src.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    metrics = run(JobConfig(input=str(src), output_dir=tmp_path / "out", rows_per_part=2))
    assert metrics.exit_code == 0
    out = rows_of(tmp_path / "out")
    assert [o["custom_id"] for o in out] == ["a", "b", "a", "c", "d"]
    assert out[0]["response"]["status_code"] == 200 and out[0]["error"] is None
    body = out[0]["response"]["body"]
    assert body["object"] == "chat.completion" and body["model"] == "m"
    assert body["choices"][0]["message"]["content"] == "echo["  # max_tokens=5: 5 byte-tokens
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 5
    assert out[1]["response"]["body"]["choices"][0]["text"].startswith("echo[")
    assert "repeated custom_id" in out[2]["error"]["message"]
    assert out[2]["response"]["status_code"] == 400
    assert "url" in out[3]["error"]["message"] and "messages" in out[4]["error"]["message"]
    assert all(name.endswith(".jsonl") for name in os.listdir(tmp_path / "out")
               if name.startswith("part-"))


def test_prompt_column_missing_is_a_config_error_before_any_work(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", ["a", "b"])
    made = []
    with pytest.raises(JobConfigError, match="prompt column 'text' is not in"):
        run_job(JobConfig(input=str(src), output_dir=tmp_path / "out", prompt_column="text"),
                make_engine=fake_engine_factory(made), reporter=QUIET)
    assert made == [] and not (tmp_path / "out").exists()
    with pytest.raises(JobConfigError, match="template uses missing_col"):
        run(JobConfig(input=str(src), output_dir=tmp_path / "out", template="{{ missing_col }}"))


def test_template_system_and_parse_json(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"review": "great", "text": "collides"}) + "\n")
    def respond(prompt, params):
        return 'Here: {"sentiment": "positive", "aspects": ["x"]}'
    job = JobConfig(input=str(src), output_dir=tmp_path / "out", template="Review: {{ review }}",
                    system="Be brief.", parse_json={"sentiment": "string", "aspects": "json"})
    run(job, responder=respond)
    [row] = rows_of(tmp_path / "out")
    assert row["input_text"] == "collides" and row["review"] == "great"
    assert row["sentiment"] == "positive" and row["aspects"] == '["x"]'


def test_a_million_row_parquet_streams_with_flat_memory(tmp_path):
    src = tmp_path / "big.parquet"
    schema = pa.schema([("prompt", pa.string()), ("k", pa.int64())])
    with pq.ParquetWriter(src, schema) as writer:
        for start in range(0, 1_000_000, 100_000):
            ks = list(range(start, start + 100_000))
            writer.write_table(pa.table({"prompt": [f"q{k % 997}" for k in ks], "k": ks},
                                        schema=schema), row_group_size=50_000)
    script = textwrap.dedent(f"""
        import sys, threading, time
        import psutil
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        peak = [0]
        def watch():  # ru_maxrss would count the forking pytest process too
            process = psutil.Process()
            while True:
                peak[0] = max(peak[0], process.memory_info().rss)
                time.sleep(0.1)
        threading.Thread(target=watch, daemon=True).start()
        from fake_engine import fake_engine_factory
        from batchgen.job.config import JobConfig
        from batchgen.job.progress import ProgressReporter
        from batchgen.job.runner import run_job
        job = JobConfig(input={str(src)!r}, output_dir={str(tmp_path / 'out')!r},
                        rows_per_part=25000, chat=False, sampling={{"temperature": 0, "max_tokens": 4}})
        m = run_job(job, make_engine=fake_engine_factory(max_num_seqs=512),
                    reporter=ProgressReporter(enabled=False))
        time.sleep(0.2)
        print(m.exit_code, m.num_rows, m.num_parts_committed, peak[0] >> 20)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    code, num_rows, num_parts, peak_mb = map(int, done.stdout.split())
    print(f"1,000,000 rows: peak RSS {peak_mb} MB")
    assert (code, num_rows, num_parts) == (0, 1_000_000, 40)
    assert peak_mb < 300  # the rows alone, held as Python records, would take over 1 GB
    last = pq.read_table(tmp_path / "out" / "part-00039.parquet")
    assert last.column("row").to_pylist() == list(range(975_000, 1_000_000))
    assert last.column("k").to_pylist()[-1] == 999_999


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_while_the_lock_is_released_does_not_kill_the_run(tmp_path, signum):
    # The signal is sent from inside ShardLock.release, so it arrives (no race) while the lock
    # is still on disk: the stop handlers must still be installed then, or the process dies
    # of the signal and leaves the lock behind.
    src = write_jsonl(tmp_path / "in.jsonl", [f"prompt {i}" for i in range(10)])
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from fake_engine import fake_engine_factory
        from batchgen.job import lock
        from batchgen.job.config import JobConfig
        from batchgen.job.progress import ProgressReporter
        from batchgen.job.runner import run_job
        release = lock.ShardLock.release
        def release_under_fire(self):
            os.kill(os.getpid(), {int(signum)})
            release(self)
        lock.ShardLock.release = release_under_fire
        job = JobConfig(input={str(src)!r}, output_dir={str(tmp_path / 'out')!r},
                        rows_per_part=4, format="jsonl")
        m = run_job(job, make_engine=fake_engine_factory(), reporter=ProgressReporter(enabled=False))
        print(m.exit_code, m.num_rows)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.split() == ["0", "10"]
    assert not list((tmp_path / "out").glob("_lock-*"))
    assert len(rows_of(tmp_path / "out")) == 10


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """Hub dataset ids served from local JSON files through datasets' own streaming loader
    (the hub itself is unreachable from tests): 'acme/reviews' -> its file, anything else ->
    the error datasets raises for an unknown id."""
    datasets = pytest.importorskip("datasets")
    real = datasets.load_dataset
    files: dict[str, Path] = {}

    def load_dataset(path, split=None, streaming=False, **kw):
        if path not in files:
            raise datasets.exceptions.DatasetNotFoundError(f"Dataset '{path}' doesn't exist")
        return real("json", data_files=str(files[path]), split=split, streaming=streaming)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    for flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):  # no reach for the network at all
        monkeypatch.setattr(datasets.config, flag, True, raising=False)
    return files


def test_hub_dataset_id_streams_through_a_job_and_resumes(tmp_path, offline_hub):
    offline_hub["acme/reviews"] = write_jsonl(tmp_path / "hub.jsonl",
                                              [f"review {i}" for i in range(23)])
    kw = dict(input="acme/reviews", output_dir=tmp_path / "out", rows_per_part=5,
              format="jsonl", sampling={"temperature": 0}, chat=False)
    first = run(JobConfig(limit=12, **kw))
    assert first.exit_code == 0 and first.num_rows == 12
    # The same job without the limit: the stream is read again from the start, rows 12-22
    # are done, and the short last part commits once the stream runs out (its length was
    # unknown until then).
    second = run(JobConfig(**kw))
    assert second.exit_code == 0 and second.num_rows_done_before == 12 and second.num_rows == 11
    rows = rows_of(tmp_path / "out")
    assert [r["row"] for r in rows] == list(range(23))
    assert all(r["text"] == f"echo[review {r['row']}]" for r in rows)
    assert rows[7]["prompt"] == "review 7" and rows[7]["n"] == 8 and rows[7]["error"] is None


def test_unknown_hub_dataset_id_is_a_config_error_before_any_work(tmp_path, offline_hub):
    with pytest.raises(JobConfigError, match="cannot open dataset acme/missing: "
                                             "DatasetNotFoundError"):
        run(JobConfig(input="acme/missing", output_dir=tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_stopped_run_returns_with_its_tokenizer_thread_ended(tmp_path, monkeypatch):
    """Nothing of the run may still be tokenizing when the process exits: a thread inside the
    tokenizer or torch during interpreter shutdown can abort the process (exit 134 instead of
    75, which Slurm's requeue depends on)."""
    import threading

    from fake_engine import FakeTokenizer

    encode = FakeTokenizer.__call__

    def slow_encode(self, *args, **kwargs):  # a tokenizer busy with long rows
        time.sleep(0.02)
        return encode(self, *args, **kwargs)

    monkeypatch.setattr(FakeTokenizer, "__call__", slow_encode)
    src = write_jsonl(tmp_path / "in.jsonl", [f"row {i}" for i in range(3000)])

    make_engine = signalling_engine(signal.SIGUSR1, at_step=2, max_num_seqs=4)
    metrics = run_job(JobConfig(input=str(src), output_dir=tmp_path / "out", chat=False,
                                rows_per_part=50, sampling={"temperature": 0}),
                      make_engine=make_engine, reporter=QUIET)
    assert metrics.exit_code == EXIT_INTERRUPTED
    assert not [t for t in threading.enumerate() if t.name == "batchgen-tokenizer"]


def test_overwrite_refuses_while_another_run_holds_the_lock(tmp_path):
    """--overwrite must not delete or relabel a folder another live run is writing into
    (it would go on committing its parts under the new job's record)."""
    from batchgen.job.lock import ShardLock
    src = write_jsonl(tmp_path / "in.jsonl", [f"p{i}" for i in range(6)])
    kw = dict(input=str(src), output_dir=tmp_path / "out", rows_per_part=2, format="jsonl")
    run(JobConfig(**kw, sampling={"max_tokens": 8}))
    job_file = (tmp_path / "out" / "_job.json").read_text()
    parts = sorted(list_parts(tmp_path / "out"))
    new_job = JobConfig(**kw, sampling={"max_tokens": 3}, overwrite=True)
    for shard in [(0, 1), (1, 2)]:  # the same shard's lock, or any other's
        with ShardLock(tmp_path / "out", *shard):
            with pytest.raises(JobConfigError, match="--overwrite: .* in use by another run"):
                run(new_job)
        assert (tmp_path / "out" / "_job.json").read_text() == job_file
        assert sorted(list_parts(tmp_path / "out")) == parts
    metrics = run(new_job)  # nobody holds it now
    assert metrics.exit_code == 0 and metrics.num_rows == 6
    assert json.loads((tmp_path / "out" / "_job.json").read_text())["fields"]["sampling"] == {
        "max_tokens": 3}


def test_an_engine_that_refuses_the_settings_is_a_config_error_leaving_no_record(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [f"p{i}" for i in range(4)])
    kw = dict(input=str(src), output_dir=tmp_path / "out", rows_per_part=2)

    def refusing_engine(job):
        raise ValueError("max_model_len=100000000 is longer than\nthe model's (8192)")

    with pytest.raises(JobConfigError, match="^cannot start the engine: max_model_len=100000000 "
                                             "is longer than the model's .8192.$"):
        run_job(JobConfig(**kw, max_model_len=100_000_000), make_engine=refusing_engine,
                reporter=QUIET)
    assert sorted(os.listdir(tmp_path / "out")) == []  # no record, no shard state, no lock
    # so the corrected command (a different job: max_model_len is not in its identity, but
    # the sampling here is) is not refused as "holds a different job"
    assert run(JobConfig(**kw, sampling={"max_tokens": 4})).exit_code == 0


@pytest.mark.parametrize("same_job", [True, False])
def test_shards_starting_together_agree_on_the_record(tmp_path, same_job):
    """The record is written once an engine has started: shards (Slurm array tasks) that
    start together all find no record, load, and the first to start writes it; a different
    job that started meanwhile is refused before it writes any part."""
    src = write_jsonl(tmp_path / "in.jsonl", [f"p{i}" for i in range(8)])
    kw = dict(input=str(src), output_dir=tmp_path / "out", rows_per_part=2, num_shards=2,
              format="jsonl")

    def engine_loaded_after_shard_1(job):  # shard 1 runs whole while shard 0 loads
        sampling = {} if same_job else {"max_tokens": 3}
        assert run(JobConfig(**kw, shard_index=1, sampling=sampling)).exit_code == 0
        return FakeLLM()

    job = JobConfig(**kw, shard_index=0)
    if same_job:
        metrics = run_job(job, make_engine=engine_loaded_after_shard_1, reporter=QUIET)
        assert metrics.exit_code == 0
        assert [r["row"] for r in rows_of(tmp_path / "out")] == list(range(8))
    else:
        with pytest.raises(JobConfigError, match="holds a different job"):
            run_job(job, make_engine=engine_loaded_after_shard_1, reporter=QUIET)
        assert sorted(list_parts(tmp_path / "out")) == [1, 3]  # shard 1's only


def test_a_stop_whose_grace_finishes_the_job_exits_0(tmp_path):
    """All rows in flight when the signal comes and all done within the grace: the job is
    done, not interrupted (a Slurm task would otherwise be requeued for nothing)."""
    src = write_jsonl(tmp_path / "in.jsonl", [f"p{i}" for i in range(30)])

    make_engine = signalling_engine(signal.SIGINT, at_step=0, max_num_seqs=32)
    job = JobConfig(input=str(src), output_dir=tmp_path / "out", rows_per_part=5, limit=20,
                    format="jsonl")
    metrics = run_job(job, make_engine=make_engine, reporter=QUIET)
    assert (metrics.exit_code, metrics.status, metrics.num_parts_committed) == (0, "done", 4)
    assert [r["row"] for r in rows_of(tmp_path / "out")] == list(range(20))


def test_a_run_of_another_split_gives_way_to_a_live_shard_sharing_its_parts(tmp_path):
    """A cron run without --shard (0/1) while a Slurm task holds shard 3/8: it must neither
    redo that task's parts beside it nor delete the temp part the task is writing (its
    rename would fail: the task dies with exit 1). It exits 0 as a second run of a shard
    does; a shard sharing no part with 3/8 (2/4) runs."""
    import io
    from batchgen.job.lock import ShardLock
    src = write_jsonl(tmp_path / "in.jsonl", [f"p{i}" for i in range(40)])
    out = tmp_path / "out"
    job = lambda i, n: JobConfig(input=str(src), output_dir=out, rows_per_part=5,  # noqa: E731
                                 format="jsonl", shard_index=i, num_shards=n)
    assert run(job(0, 8)).exit_code == 0
    with ShardLock(out, 3, 8):  # the Slurm task, writing part 3
        writing = out / "_tmp-part-00003-4242.jsonl.tmp"
        writing.write_text("half a part")
        stream = io.StringIO()
        for i, n in [(0, 1), (3, 4)]:
            metrics = run_job(job(i, n), make_engine=fake_engine_factory(),
                              reporter=ProgressReporter(stream, enabled=True))
            assert (metrics.exit_code, metrics.status) == (0, "already running")
        assert writing.exists() and sorted(list_parts(out)) == [0]
        assert "shard 0/1 is already running: shard 3/8 held by host" in stream.getvalue()
        assert run(job(2, 4)).exit_code == 0
        assert sorted(list_parts(out)) == [0, 2, 6]
        assert not (out / "_lock-0-of-1.json").exists()  # given way: no lock of its own left
    assert run(job(0, 1)).num_rows == 25
    assert [r["row"] for r in rows_of(out)] == list(range(40))
