"""Parts: atomic commit, one schema for all parts, input order restored, parsed JSON; export."""
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchgen.job.export import export_job
from batchgen.job.writer import (OutputSchema, PartCollector, PartWriter, list_parts,
                                 parse_json_columns, read_part)


def _record(row, schema, **extra):
    base = {"row": row, "text": f"t{row}", "finish_reason": "stop", "prompt_tokens": 1,
            "output_tokens": 2, "error": None}
    base.update(extra)
    return {name: base.get(name) for name in schema.names}


def test_output_schema_renames_colliding_input_columns_and_adds_parsed_columns():
    schema = OutputSchema(pa.schema([("text", pa.string()), ("id", pa.int64()),
                                     ("error", pa.string()), ("label", pa.string())]),
                          parse_json={"label": "string", "score": "number"})
    assert schema.input_names == {"text": "input_text", "id": "id", "error": "input_error",
                                  "label": "input_label"}
    assert schema.arrow.names == ["row", "input_text", "id", "input_error", "input_label", "text",
                                  "finish_reason", "prompt_tokens", "output_tokens", "error",
                                  "label", "score"]
    with pytest.raises(ValueError, match="no input column"):
        OutputSchema(pa.schema([("a", pa.string())]), keep=["b"])


def test_part_is_committed_by_rename_and_leaves_no_temp_file(tmp_path):
    schema = OutputSchema(pa.schema([("prompt", pa.string())])).arrow
    writer = PartWriter(tmp_path, "parquet", schema)
    path = writer.write(7, [_record(r, schema, prompt="p") for r in range(70, 75)])
    assert path.name == "part-00007.parquet"
    assert sorted(os.listdir(tmp_path)) == ["part-00007.parquet"]
    assert pq.read_table(path).schema.equals(schema)
    (tmp_path / "_tmp-part-00007-123.parquet").write_bytes(b"half")
    (tmp_path / "_tmp-part-00008-123.parquet").write_bytes(b"other shard")
    writer.remove_stale_tmp([7])
    assert sorted(os.listdir(tmp_path)) == ["_tmp-part-00008-123.parquet", "part-00007.parquet"]
    assert list_parts(tmp_path) == {7: path}


def test_a_part_being_written_or_left_by_a_killed_run_is_not_in_a_parquet_glob(tmp_path,
                                                                               monkeypatch):
    """DuckDB's `select * from 'out/*.parquet'` read a half-written `_tmp-part-*.parquet`
    (and failed) until the next run; a killed run's temp file of part 100000 or later was
    never removed (its number was cut to five digits)."""
    schema = OutputSchema(pa.schema([("prompt", pa.string())])).arrow
    writer = PartWriter(tmp_path, "parquet", schema)
    globbed = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (globbed.append(
        sorted(p.name for p in tmp_path.glob("*.parquet"))), real_fsync(fd)))
    writer.write(0, [_record(0, schema, prompt="p")])
    assert globbed[0] == []  # the temp file is there, just not a *.parquet
    monkeypatch.undo()
    (tmp_path / "_tmp-part-123456-9.parquet.tmp").write_bytes(b"killed")
    (tmp_path / "_tmp-part-12345-9.parquet.tmp").write_bytes(b"another part")
    writer.remove_stale_tmp([123456])
    assert sorted(os.listdir(tmp_path)) == ["_tmp-part-12345-9.parquet.tmp", "part-00000.parquet"]


def test_collector_restores_input_order_and_commits_whole_parts_only(tmp_path):
    writer = PartWriter(tmp_path, "jsonl", None)
    collector = PartCollector(writer, rows_per_part=3, stop=8)
    assert collector.add(4, {"row": 4}) == []
    assert collector.add(2, {"row": 2}) == []
    assert collector.add(0, {"row": 0}) == []
    committed = collector.add(1, {"row": 1})
    assert [p for p, _ in committed] == [0]
    assert [r["row"] for r in read_part(committed[0][1])] == [0, 1, 2]
    assert collector.add(7, {"row": 7}) == []
    assert [p for p, _ in collector.add(6, {"row": 6})] == [2]  # part 2 = rows 6..7 (stop=8)
    assert collector.add(3, {"row": 3}) == []
    assert [p for p, _ in collector.add(5, {"row": 5})] == [1]
    assert list_parts(tmp_path).keys() == {0, 1, 2} and not collector.pending


def test_collector_with_unknown_length_commits_the_last_part_at_the_end(tmp_path):
    collector = PartCollector(PartWriter(tmp_path, "jsonl", None), rows_per_part=4, stop=None)
    for row in range(6):
        collector.add(row, {"row": row})
    assert list(list_parts(tmp_path)) == [0]
    assert [p for p, _ in collector.set_stop(6)] == [1]


def test_parse_json_columns_types_and_failures():
    columns = {"sentiment": "string", "score": "number", "n": "integer", "ok": "boolean",
               "aspects": "json"}
    text = 'Sure! {"sentiment": "positive", "score": 1, "n": 2.0, "ok": true, "aspects": ["a"]} done'
    assert parse_json_columns(text, columns) == {"sentiment": "positive", "score": 1.0, "n": 2,
                                                 "ok": True, "aspects": '["a"]'}
    assert parse_json_columns('{"n": "two", "ok": 1}', columns)["n"] is None
    assert parse_json_columns("no json here", columns) == dict.fromkeys(columns)
    assert parse_json_columns(None, columns) == dict.fromkeys(columns)
    assert parse_json_columns('{"sentiment": {"x": 1}}', columns)["sentiment"] == '{"x": 1}'


def test_parse_json_skips_braces_that_start_no_object_with_the_columns():
    columns = {"a": "integer"}
    assert parse_json_columns('Set {x} first, then: {"a": 5}', columns) == {"a": 5}
    assert parse_json_columns('```json\n{"a": 1}\n``` and {"a": 2}', columns) == {"a": 1}
    assert parse_json_columns('{"meta": {"v": 1}} then {"a": 3}', columns) == {"a": 3}
    assert parse_json_columns("{" * 1000, columns) == {"a": None}


def test_export_writes_parts_in_order_and_refuses_an_incomplete_job(tmp_path):
    from batchgen.job.checkpoint import JOB_FILE
    out = tmp_path / "out"
    out.mkdir()
    (out / JOB_FILE).write_text(json.dumps({"fingerprint": "abcd1234", "fields": {},
                                            "rows_per_part": 2, "format": "jsonl",
                                            "num_input_rows": 5}))
    writer = PartWriter(out, "jsonl", None)
    writer.write(1, [{"row": 2}, {"row": 3}])
    writer.write(0, [{"row": 0}, {"row": 1}])
    assert export_job(out, tmp_path / "all.jsonl") == 1  # part 2 missing
    assert export_job(out, tmp_path / "all.jsonl", allow_partial=True) == 0
    lines = (tmp_path / "all.jsonl").read_text().splitlines()
    assert [json.loads(x)["row"] for x in lines] == [0, 1, 2, 3]


def _cli():
    from typer.testing import CliRunner

    from batchgen.cli import build_app
    from fake_engine import fake_engine_factory
    app, runner = build_app(make_engine=fake_engine_factory()), CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


def _run_job(cli, src, out, fmt):
    result = cli("run", "-i", src, "-o", out, "--no-chat", "-q", "--rows-per-part", "4",
                 "--format", fmt)
    assert result.exit_code == 0, result.output


def test_export_converts_jsonl_parts_to_the_same_parquet_a_parquet_job_writes(tmp_path):
    cli = _cli()
    src = tmp_path / "in.jsonl"
    # an empty prompt is an error row: a part whose `text` is all null, typed by the others
    rows = [{"prompt": "" if i < 4 else f"p{i}", "n": i, "x": i / 2, "ok": i % 2 == 0,
             "tags": [i]} for i in range(10)]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _run_job(cli, src, tmp_path / "pq", "parquet")
    _run_job(cli, src, tmp_path / "js", "jsonl")
    assert cli("export", tmp_path / "pq", tmp_path / "a.parquet").exit_code == 0
    result = cli("export", tmp_path / "js", tmp_path / "b.parquet")
    assert result.exit_code == 0, result.output
    expected, got = pq.read_table(tmp_path / "a.parquet"), pq.read_table(tmp_path / "b.parquet")
    assert got.schema == expected.schema
    assert got.equals(expected)
    assert got.column("text").to_pylist()[:4] == [None] * 4


def test_export_mistakes_are_one_line_config_errors(tmp_path):
    cli = _cli()
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(5)))
    out = tmp_path / "out"
    _run_job(cli, src, out, "parquet")
    (tmp_path / "folder").mkdir()
    cases = {tmp_path / "folder": "is a folder",
             tmp_path / "all.csv": "must end in .jsonl or .parquet",
             out / "all.parquet": "inside the job folder"}
    for target, message in cases.items():
        result = cli("export", out, target)
        assert result.exit_code == 2, result.output
        assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "all.csv").exists() and not (out / "all.parquet").exists()
    assert sorted(p.name for p in (tmp_path / "folder").iterdir()) == []


def test_export_of_an_openai_batch_job_is_jsonl_only(tmp_path):
    cli = _cli()
    src = tmp_path / "batch.jsonl"
    src.write_text(json.dumps({"custom_id": "r1", "method": "POST", "url": "/v1/completions",
                               "body": {"model": "m", "prompt": "hi"}}) + "\n")
    out = tmp_path / "out"
    assert cli("run", "-i", src, "-o", out, "-q").exit_code == 0  # batch lines: no --chat flag
    result = cli("export", out, tmp_path / "all.parquet")
    assert result.exit_code == 2 and "export it as .jsonl" in result.output
    assert cli("export", out, tmp_path / "all.jsonl").exit_code == 0
    assert json.loads((tmp_path / "all.jsonl").read_text())["custom_id"] == "r1"


def test_an_input_with_text_and_input_text_keeps_both_in_readable_parts(tmp_path):
    """An earlier job's output as input: `text` is renamed past `input_text`, not onto it
    (a duplicate column: parts pyarrow and pandas cannot read, one value lost)."""
    from batchgen.job.config import JobConfig
    from batchgen.job.progress import ProgressReporter
    from batchgen.job.runner import run_job
    from fake_engine import fake_engine_factory
    schema = OutputSchema(pa.schema([("text", pa.string()), ("input_text", pa.string()),
                                     ("input_input_text", pa.string())]))
    assert schema.input_names == {"text": "input_input_input_text", "input_text": "input_text",
                                  "input_input_text": "input_input_text"}
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"prompt": "p", "text": "earlier", "input_text": "first"}) + "\n")
    metrics = run_job(JobConfig(input=str(path), output_dir=tmp_path / "out", chat=False),
                      make_engine=fake_engine_factory(), reporter=ProgressReporter(enabled=False))
    assert metrics.exit_code == 0
    row = pq.read_table(tmp_path / "out").to_pylist()[0]
    assert (row["input_input_text"], row["input_text"]) == ("earlier", "first")


def _strict_lines(path):
    """Each line of `path` parsed as standard JSON: the bare NaN / Infinity / -Infinity tokens
    Python's json reads (and by default writes) are refused, as jq and DuckDB refuse them."""
    def refuse(token):
        raise ValueError(f"{path.name}: {token} is not JSON")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_jsonl_parts_write_nan_and_infinities_as_null(tmp_path):
    import numpy as np
    nan, inf = float("nan"), float("inf")
    records = [{"row": 0, "x": nan, "y": inf, "z": -inf, "ok": 1.5},
               {"row": 1, "x": [1.0, nan], "y": {"k": -inf}, "z": np.float32("nan"),
                "ok": np.array([2.0, np.inf])}]
    path = PartWriter(tmp_path, "jsonl", None).write(0, records)
    assert _strict_lines(path) == [{"row": 0, "x": None, "y": None, "z": None, "ok": 1.5},
                                   {"row": 1, "x": [1.0, None], "y": {"k": None}, "z": None,
                                    "ok": [2.0, None]}]
    for line in path.read_text().splitlines():  # what a strict writer accepts, unchanged
        assert json.dumps(json.loads(line), ensure_ascii=False, allow_nan=False) == line
    assert parse_json_columns('{"a": [NaN, Infinity]}', {"a": "json"}) == {"a": "[null, null]"}


def test_nan_from_the_input_is_null_in_jsonl_parts_and_exports_and_nan_in_parquet(tmp_path):
    cli = _cli()
    src = tmp_path / "in.parquet"
    nan, inf = float("nan"), float("inf")
    pq.write_table(pa.table({"prompt": ["a", "b", "c"], "score": [nan, inf, 0.5],
                             "v": [[nan], [1.0], [-inf]]}), src)
    _run_job(cli, src, tmp_path / "js", "jsonl")
    parts = sorted((tmp_path / "js").glob("part-*.jsonl"))
    rows = [r for p in parts for r in _strict_lines(p)]
    assert [(r["score"], r["v"]) for r in rows] == [(None, [None]), (None, [1.0]), (0.5, [None])]
    assert cli("export", tmp_path / "js", tmp_path / "all.jsonl").exit_code == 0
    assert [r["score"] for r in _strict_lines(tmp_path / "all.jsonl")] == [None, None, 0.5]
    # a part written before NaN became null is exported as standard JSON all the same
    parts[0].write_text(parts[0].read_text().replace('"score": null', '"score": NaN', 1))
    assert "NaN" in parts[0].read_text()
    assert cli("export", tmp_path / "js", tmp_path / "again.jsonl").exit_code == 0
    assert [r["score"] for r in _strict_lines(tmp_path / "again.jsonl")] == [None, None, 0.5]
    _run_job(cli, src, tmp_path / "pq", "parquet")
    score = pq.read_table(tmp_path / "pq").column("score").to_pylist()
    assert score[0] != score[0] and score[1:] == [inf, 0.5]  # Parquet keeps NaN and inf
