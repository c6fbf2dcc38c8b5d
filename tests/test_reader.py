"""Readers: every JSONL line is a record, Parquet by row group, datasets, row selections."""
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchgen.job.config import JobConfig, JobConfigError
from batchgen.job.hf_dataset_reader import HFDatasetReader
from batchgen.job.input_format import detect_format, open_reader
from batchgen.job.jsonl_reader import JsonlReader, count_lines, parse_jsonl_line
from batchgen.job.parquet_reader import ParquetReader
from batchgen.job.row_selection import RowSelection


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
    assert count_lines(lambda: open(plain, "rb")) == 2


def test_jsonl_schema_is_inferred_and_values_that_do_not_fit_are_null(tmp_path):
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
