"""A Parquet folder of several splits (as `huggingface-cli download` leaves one) is read as the
split --split picks, never as one table mixing them."""
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchgen.job.config import JobConfig, JobConfigError
from batchgen.job.input_format import open_reader
from batchgen.job.parquet_reader import split_of
from batchgen.job.row_selection import RowSelection

LAYOUTS = {  # relative file path -> split its rows are from
    "sharded": {"data/train-00000-of-00002.parquet": "train",
                "data/train-00001-of-00002.parquet": "train",
                "data/test-00000-of-00001.parquet": "test"},
    "folders": {"train/0000.parquet": "train", "train/0001.parquet": "train",
                "test/0000.parquet": "test"},
    "files": {"train.parquet": "train", "validation.parquet": "validation"},
}


def make_folder(root: Path, files: dict[str, str]) -> Path:
    for i, (name, split) in enumerate(files.items()):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"prompt": [f"{split}-{i}-{j}" for j in range(3)]}), path)
    return root


def prompts(folder: Path, **job) -> list[str]:
    reader = open_reader(JobConfig(input=str(folder), output_dir=folder.parent / "out", **job))
    rows = list(reader.iter_rows(RowSelection(100)))
    assert reader.num_rows == len(rows)
    return [r.fields["prompt"] for r in rows]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_a_folder_of_several_splits_reads_the_split_asked_for(tmp_path, layout):
    folder = make_folder(tmp_path / "ds", LAYOUTS[layout])
    for split in set(LAYOUTS[layout].values()):
        got = prompts(folder, split=split)
        assert got and all(p.startswith(f"{split}-") for p in got), (split, got)
    assert all(p.startswith("train-") for p in prompts(folder))  # the default split: train


def test_a_split_not_in_the_folder_is_a_config_error_listing_the_splits(tmp_path):
    folder = make_folder(tmp_path / "ds", LAYOUTS["sharded"])
    with pytest.raises(JobConfigError, match=r"no split 'validation' \(splits: test, train\)"):
        prompts(folder, split="validation")
    only_test = make_folder(tmp_path / "t", {"test.parquet": "test", "validation.parquet": "v"})
    with pytest.raises(JobConfigError, match=r"no split 'train' \(splits: test, validation\)"):
        prompts(only_test)  # the default asks for train


def test_one_split_or_no_split_names_is_one_table_as_before(tmp_path):
    one = make_folder(tmp_path / "one", {"data/test-00000-of-00002.parquet": "a",
                                         "data/test-00001-of-00002.parquet": "b"})
    assert len(prompts(one)) == 6 and len(prompts(one, split="other")) == 6
    unnamed = make_folder(tmp_path / "plain", {"0.parquet": "a", "x/1.parquet": "b"})
    assert len(prompts(unnamed, split="test")) == 6
    ident = open_reader(JobConfig(input=str(unnamed), output_dir=tmp_path / "out")).identity()
    assert "split" not in ident  # jobs over such folders keep the fingerprint they had


def test_split_names_follow_datasets_keywords_and_shards():
    cases = {"data/train-00000-of-00001-abc.parquet": "train", "dev.parquet": "validation",
             "val_part1.parquet": "validation", "Eval-1.parquet": "test",
             "plain_text/unsupervised-00000-of-00001.parquet": "unsupervised",
             "default/test/0000.parquet": "test", "training/x/trainer.parquet": "train",
             "trainer.parquet": None, "contest.parquet": None, "part-00000.parquet": None,
             "reviews.parquet": None}
    assert {name: split_of(Path(name)) for name in cases} == cases


def test_the_fingerprint_covers_the_split_and_a_resume_with_another_is_refused(tmp_path):
    from typer.testing import CliRunner

    from batchgen.cli import build_app
    from fake_engine import fake_engine_factory
    folder = make_folder(tmp_path / "ds", LAYOUTS["sharded"])
    idents = [open_reader(JobConfig(input=str(folder), output_dir=tmp_path / "o", split=s))
              .identity() for s in ("train", "test")]
    assert [i["split"] for i in idents] == ["train", "test"]
    assert [len(i["files"]) for i in idents] == [2, 1]
    app, runner = build_app(make_engine=fake_engine_factory()), CliRunner()
    out = tmp_path / "out"

    def run(*args):
        return runner.invoke(app, ["run", "-i", str(folder), "-o", str(out), "--no-chat", "-q",
                                   "--format", "jsonl", *args])
    result = run("--split", "test")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for p in sorted(out.glob("part-*.jsonl"))
            for line in p.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["test-2-0", "test-2-1", "test-2-2"]
    refused = run("--split", "train")
    assert refused.exit_code == 2 and "different job" in refused.output
    missing = run("--split", "dev", "--overwrite")
    assert missing.exit_code == 2, missing.output
    assert len(missing.output.strip().splitlines()) == 1
    assert "no split 'dev' (splits: test, train)" in missing.output
