"""Readers: every JSONL line is a record, Parquet by row group, datasets, row selections."""
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchgen.job.config import JobConfig, JobConfigError
from batchgen.job.hf_dataset_reader import HFDatasetReader
from batchgen.job.input_format import detect_format, open_reader
from batchgen.job.jsonl_reader import MAX_COLUMNS, JsonlReader, parse_jsonl_line
from batchgen.job.openai_batch import parse_request
from batchgen.job.parquet_reader import ParquetReader
from batchgen.job.row_selection import RowSelection
from batchgen.job.writer import OutputSchema
from batchgen.recipe import RowError


def write_lines(path, lines: list[bytes], newline_at_end=True):
    data = b"\n".join(lines) + (b"\n" if newline_at_end else b"")
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def test_every_jsonl_line_is_a_record_and_bad_lines_say_why(tmp_path):
    lines = [b'{"prompt": "a"}', b"", b"   ", b"{not json", b'"just a string"', b"[1, 2]",
             b'{"prompt": "caf\xc3\xa9"}', b'{"prompt": "\xff\xfe"}', b'{"prompt": "last"}']
    path = write_lines(tmp_path / "in.jsonl", lines, newline_at_end=False)
    reader = JsonlReader(str(path))
    rows = list(reader.iter_rows(RowSelection(rows_per_part=100)))
    assert [r.index for r in rows] == list(range(9))
    assert reader.num_rows == 9
    assert rows[0].fields == {"prompt": "a"} and rows[0].error is None
    assert "blank line" in rows[1].error and "blank line" in rows[2].error
    assert "malformed JSON" in rows[3].error
    assert "not an object" in rows[4].error and "not an object" in rows[5].error
    assert rows[6].fields["prompt"] == "café"
    assert "undecodable bytes" in rows[7].error
    assert rows[8].fields == {"prompt": "last"}


def test_gzip_jsonl_and_line_count(tmp_path):
    path = write_lines(tmp_path / "in.jsonl.gz", [json.dumps({"p": i}).encode() for i in range(7)])
    reader = JsonlReader(str(path))
    assert reader.num_rows == 7
    assert [r.fields["p"] for r in reader.iter_rows(RowSelection(3, stop=5))] == [0, 1, 2, 3, 4]
    plain = write_lines(tmp_path / "x.jsonl", [b"a", b"b"], newline_at_end=False)
    assert JsonlReader(str(plain)).num_rows == 2
    empty = write_lines(tmp_path / "e.jsonl", [], newline_at_end=False)
    assert JsonlReader(str(empty)).num_rows == 0


def test_jsonl_schema_is_inferred(tmp_path):
    records = [{"a": 1, "b": "x", "c": 1, "d": {"k": 1}, "e": True},
               {"a": 2, "b": None, "c": 2.5, "d": [1], "e": False}]
    path = write_lines(tmp_path / "in.jsonl", [json.dumps(r).encode() for r in records])
    reader = JsonlReader(str(path))
    assert reader.schema.field("a").type == pa.int64()
    assert reader.schema.field("b").type == pa.string()
    assert reader.schema.field("c").type == pa.float64()
    assert reader.schema.field("d").type == pa.string()  # mixed objects: JSON text
    assert reader.output_value("a", "not a number") is None
    assert reader.output_value("c", 3) == 3.0
    assert reader.output_value("d", {"k": 1}) == '{"k": 1}'
    assert reader.output_value("e", 1) is None


def _late_surprises(tmp_path):
    """100 uniform records, then a record whose types differ and one with a new column."""
    records = [{"prompt": "", "id": i, "v": 1} for i in range(100)]
    records += [{"id": "x-100", "v": 4.5}, {"id": 101, "v": "abc", "extra": "kept?"}]
    return write_lines(tmp_path / "types.jsonl", [json.dumps(r).encode() for r in records])


def test_jsonl_schema_covers_the_whole_file_so_late_values_and_columns_are_kept(tmp_path):
    reader = JsonlReader(str(_late_surprises(tmp_path)))
    assert reader.columns == ["prompt", "id", "v", "extra"]
    assert reader.num_rows == 102
    schema = OutputSchema(reader.schema)
    records = [{column: reader.output_value(column, row.fields.get(column))
                for column in schema.input_names}
               for row in reader.iter_rows(RowSelection(rows_per_part=1000))]
    # what a part stores: every value must fit the schema every part is written with
    table = pa.Table.from_pylist(records, schema=pa.schema([schema.arrow.field(c)
                                                            for c in reader.columns]))
    assert table.slice(99).to_pylist() == [
        {"prompt": "", "id": "99", "v": "1", "extra": None},
        {"prompt": None, "id": "x-100", "v": "4.5", "extra": None},
        {"prompt": None, "id": "101", "v": "abc", "extra": "kept?"}]


def test_jsonl_type_widening_never_rounds_or_drops(tmp_path):
    records = [{"f": 1, "big": 2**60, "b": True, "n": None}] * 150
    records += [{"f": 2.5, "big": 0.5, "b": 3, "n": None, "huge": 2**70}]
    reader = JsonlReader(str(write_lines(tmp_path / "in.jsonl",
                                         [json.dumps(r).encode() for r in records])))
    assert reader.kinds == {"f": "float", "big": "json", "b": "json", "n": "string",
                            "huge": "json"}
    assert reader.output_value("f", 1) == 1.0
    assert reader.output_value("big", 2**60 + 1) == str(2**60 + 1)  # float64 would round it
    assert reader.output_value("b", True) == "true"
    assert reader.output_value("huge", 2**70) == str(2**70)


def test_jsonl_identity_changes_when_a_late_record_changes_the_schema(tmp_path):
    """Same path, size and first MiB: a job resumed on the changed file must not write parts
    of another schema."""
    head = [json.dumps({"prompt": "x" * 60, "v": 1}).encode()] * 20_000  # > 1 MiB
    path = tmp_path / "in.jsonl"
    write_lines(path, head + [b'{"v":123}'])
    before = JsonlReader(str(path)).identity()
    write_lines(path, head + [b'{"v":"a"}'])
    after = JsonlReader(str(path)).identity()
    assert before["size"] == after["size"] and before != after


def test_jsonl_with_a_new_key_per_record_is_a_config_error(tmp_path):
    lines = [json.dumps({"prompt": "p", f"k{i}": i}).encode() for i in range(MAX_COLUMNS + 1)]
    with pytest.raises(JobConfigError, match="distinct keys"):
        JsonlReader(str(write_lines(tmp_path / "in.jsonl", lines)))


def test_run_keeps_jsonl_values_and_columns_after_the_first_100_records(tmp_path):
    from typer.testing import CliRunner

    from batchgen.cli import build_app
    from fake_engine import fake_engine_factory
    out = tmp_path / "out"
    result = CliRunner().invoke(build_app(make_engine=fake_engine_factory()),
                                ["run", "-i", str(_late_surprises(tmp_path)), "-o", str(out),
                                 "--no-chat", "-q"])
    assert result.exit_code == 0, result.output
    table = pq.read_table(out)
    assert table.select(["id", "v", "extra"]).slice(100).to_pylist() == [
        {"id": "x-100", "v": "4.5", "extra": None}, {"id": "101", "v": "abc", "extra": "kept?"}]


def _chat(body: dict) -> dict:
    return {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "m", **body}}


def test_openai_request_content_may_be_a_list_of_text_parts():
    request = parse_request(_chat({"messages": [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "Hello"},
                                     {"type": "text", "text": "there"}]}]}))
    assert request.messages == [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "Hello\nthere"}]
    image = {"type": "image_url", "image_url": {"url": "https://x/cat.png"}}
    with pytest.raises(RowError, match=r"messages\[0\]\.content: a part of type 'image_url'"):
        parse_request(_chat({"messages": [{"role": "user", "content": [image]}]}))
    with pytest.raises(RowError, match="must be a string or a list of text parts"):
        parse_request(_chat({"messages": [{"role": "user", "content": None}]}))
    with pytest.raises(RowError, match="`text` must be a string"):
        parse_request(_chat({"messages": [{"role": "user", "content": [{"type": "text"}]}]}))


def test_openai_request_null_optional_fields_mean_absent():
    nulls = dict.fromkeys(["n", "stop", "temperature", "top_p", "max_tokens",
                           "max_completion_tokens", "seed", "presence_penalty",
                           "frequency_penalty"])
    request = parse_request(_chat({"messages": [{"role": "user", "content": "hi"}], **nulls}))
    assert request.sampling == {}
    request = parse_request(_chat({"messages": [{"role": "user", "content": "hi"}], "n": 1,
                                   "max_tokens": None, "max_completion_tokens": 5}))
    assert request.sampling == {"max_tokens": 5}
    with pytest.raises(RowError, match="n=2 is not supported"):
        parse_request(_chat({"messages": [{"role": "user", "content": "hi"}], "n": 2}))


def test_openai_request_refuses_parameters_it_would_silently_ignore():
    hi = {"messages": [{"role": "user", "content": "hi"}]}
    harmless = {"response_format": {"type": "text"}, "tools": [], "tool_choice": "none",
                "logprobs": False, "modalities": ["text"], "user": "u1", "metadata": {"k": "v"},
                "store": False, "stream": False}
    assert parse_request(_chat({**hi, **harmless})).messages == hi["messages"]
    tool = {"type": "function", "function": {"name": "f", "parameters": {}}}
    for key, value in [("response_format", {"type": "json_object"}), ("tools", [tool]),
                       ("tool_choice", "required"), ("logit_bias", {"50256": -100}),
                       ("logprobs", True), ("top_logprobs", 3)]:
        with pytest.raises(RowError, match=f"body.{key} is not supported"):
            parse_request(_chat({**hi, key: value}))
    completion = {"custom_id": "r2", "method": "POST", "url": "/v1/completions",
                  "body": {"prompt": "once", "echo": True}}
    with pytest.raises(RowError, match="body.echo is not supported"):
        parse_request(completion)


def test_row_selection_shards_done_parts_and_resume_points():
    sel = RowSelection(rows_per_part=10, shard_index=1, num_shards=3, done_parts=frozenset({4}),
                       resume_from={7: 75}, stop=95)
    wanted = [r for r in range(120) if sel.contains(r)]
    assert wanted == list(range(10, 20)) + list(range(75, 80))  # parts 1, (4 done), 7 from 75
    assert sel.overlaps(0, 15) and not sel.overlaps(20, 40) and not sel.overlaps(40, 50)
    assert not sel.overlaps(70, 75) and sel.overlaps(70, 76)
    assert not sel.overlaps(95, 200)  # past stop


def test_parquet_reads_only_selected_row_groups(tmp_path):
    table = pa.table({"prompt": [f"p{i}" for i in range(1000)], "n": list(range(1000))})
    path = tmp_path / "in.parquet"
    pq.write_table(table, path, row_group_size=100)
    reader = ParquetReader(str(path))
    assert reader.num_rows == 1000 and reader.columns == ["prompt", "n"]
    sel = RowSelection(rows_per_part=100, shard_index=2, num_shards=4, stop=1000)
    rows = list(reader.iter_rows(sel))
    assert [r.index for r in rows] == list(range(200, 300)) + list(range(600, 700))
    assert all(r.fields["n"] == r.index for r in rows)


def test_parquet_folder_is_one_table_in_path_order(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(3):
        pq.write_table(pa.table({"prompt": [f"f{i}-{j}" for j in range(4)]}), folder / f"{i}.parquet")
    (folder / "_ignored.parquet").write_bytes(b"junk")
    reader = open_reader(JobConfig(input=str(folder), output_dir=tmp_path / "out"))
    assert reader.num_rows == 12
    rows = list(reader.iter_rows(RowSelection(5)))
    assert rows[5].index == 5 and rows[5].fields["prompt"] == "f1-1"


def test_saved_hf_dataset_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{"prompt": f"q{i}", "k": i} for i in range(30)])
    ds.save_to_disk(str(tmp_path / "ds"))
    assert detect_format(str(tmp_path / "ds")) == "hf"
    reader = HFDatasetReader(str(tmp_path / "ds"))
    assert reader.num_rows == 30 and set(reader.columns) == {"prompt", "k"}
    rows = list(reader.iter_rows(RowSelection(10, shard_index=1, num_shards=2)))
    assert [r.fields["k"] for r in rows] == list(range(10, 20))


def test_unknown_format_and_missing_input_are_config_errors(tmp_path):
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(JobConfigError, match="cannot tell the format"):
        detect_format(str(tmp_path / "data.csv"))
    with pytest.raises(JobConfigError, match="input not found"):
        JobConfig(input=str(tmp_path / "missing.jsonl"), output_dir=tmp_path / "o")


def test_parse_line_strips_crlf():
    assert parse_jsonl_line(0, b'{"a": 1}\r\n').fields == {"a": 1}


def test_a_utf8_bom_starts_the_file_not_the_first_record(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "a"}\n{"prompt": "b"}\n')
    reader = JsonlReader(str(path))
    assert reader.columns == ["prompt"]
    rows = list(reader.iter_rows(RowSelection(rows_per_part=10)))
    assert [(r.fields, r.error) for r in rows] == [({"prompt": "a"}, None), ({"prompt": "b"}, None)]
    assert parse_jsonl_line(1, b"\xef\xbb\xbf{}").error is not None  # only at the start


@pytest.mark.parametrize("content, message", [
    (b"", None), (b"\x1f\x8b\x08\x00", "Compressed file ended"), (b'{"a": 1}', "Not a gzipped")])
def test_unreadable_gzip_is_a_config_error(tmp_path, content, message):
    path = tmp_path / "x.jsonl.gz"
    path.write_bytes(content)
    if message is None:
        assert JsonlReader(str(path)).num_rows == 0
        return
    with pytest.raises(JobConfigError, match=f"^cannot read input .*x.jsonl.gz: {message}"):
        JsonlReader(str(path))


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_half_a_surrogate_pair_is_a_bad_row_not_a_job_that_fails_every_run(tmp_path, fmt):
    """`"\\ud83d"` (half an emoji, cut by an ASCII-escaping writer) is JSON Python reads but
    no UTF-8 part can hold: the part's write failed, on every resume."""
    from typer.testing import CliRunner

    from batchgen.cli import build_app
    from fake_engine import fake_engine_factory
    path = tmp_path / "in.jsonl"
    long_text = "é😀\u4e2d" * 100_000
    path.write_text("\n".join([json.dumps({"prompt": "a", "note": "cut \ud83d"}),
                               json.dumps({"prompt": "b", "note": "whole \ud83d\ude00"}),
                               r'{"prompt": "c", "note": "\\ud83d is text"}',
                               json.dumps({"prompt": "d", "note": long_text})]) + "\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(build_app(make_engine=fake_engine_factory()),
                                ["run", "-i", str(path), "-o", str(out), "--no-chat", "-q",
                                 "--format", fmt])
    assert result.exit_code == 0, result.output
    from batchgen.job.writer import list_parts, read_part
    rows = read_part(list_parts(out)[0])
    assert rows[0]["note"] is None and "surrogate" in rows[0]["error"]
    assert [r["note"] for r in rows[1:]] == ["whole \U0001f600", "\\ud83d is text", long_text]
    assert [r["error"] for r in rows[1:]] == [None] * 3


def test_a_saved_single_split_refuses_another_split_by_name(tmp_path):
    """`--split test` on a folder holding one saved Dataset (not a DatasetDict) read that
    dataset whatever it was, silently."""
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{"prompt": "q"}])
    ds.save_to_disk(str(tmp_path / "plain"))
    assert HFDatasetReader(str(tmp_path / "plain")).num_rows == 1  # the default split: it
    with pytest.raises(JobConfigError, match=r"is one split \(unnamed\), not a DatasetDict: "
                                             r"no split 'test'"):
        HFDatasetReader(str(tmp_path / "plain"), split="test")
    datasets.Dataset.from_list([{"prompt": "q"}], split="test").save_to_disk(str(tmp_path / "t"))
    assert HFDatasetReader(str(tmp_path / "t"), split="test").num_rows == 1


def test_a_stream_without_declared_features_takes_its_types_from_its_first_records(
        tmp_path, monkeypatch):
    """A hub stream of JSON files declares no features: typed from its first record alone, a
    null there (or an int where 2.5 follows) failed the part's write, on every run."""
    datasets = pytest.importorskip("datasets")
    from typer.testing import CliRunner

    from batchgen.cli import build_app
    from fake_engine import fake_engine_factory

    def records():
        yield {"prompt": "a", "meta": None, "n": 1, "id": "x"}
        for i in range(4):
            yield {"prompt": f"p{i}", "meta": {"k": i}, "n": 2.5, "id": 7 if i == 3 else "y"}
    stream = datasets.IterableDataset.from_generator(records)
    assert stream.features is None
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: stream)
    out = tmp_path / "out"
    result = CliRunner().invoke(build_app(make_engine=fake_engine_factory()),
                                ["run", "-i", "someorg/data", "--input-format", "hf",
                                 "-o", str(out), "--no-chat", "-q", "--rows-per-part", "2"])
    assert result.exit_code == 0, result.output
    table = pq.read_table(out)
    assert table.select(["meta", "n", "id"]).to_pylist() == [
        {"meta": None, "n": 1.0, "id": "x"}, {"meta": '{"k": 0}', "n": 2.5, "id": "y"},
        {"meta": '{"k": 1}', "n": 2.5, "id": "y"}, {"meta": '{"k": 2}', "n": 2.5, "id": "y"},
        {"meta": '{"k": 3}', "n": 2.5, "id": "7"}]
