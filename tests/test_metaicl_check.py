"""`mendctl data metaicl DIR [--partition NAME]`: a folder MetaICL's scripts made, checked against a
partition; what is missing is named by task, seed and split, with exit code 2."""
import json

import pytest
from click.testing import CliRunner

from mendctl.cli import cli
from mendctl.data.metaicl import DEFAULT_SEEDS, split_name
from mendctl.core.partitions import METAICL_PARTITIONS, list_partitions

ROW = json.dumps({"input": "a movie", "output": "good", "options": ["good", "bad"]}) + "\n"


def make_folder(root, train=("train_a", "train_b"), test=("test_c", "test_d")):
    for task in train:
        (root / task).mkdir(parents=True)
        (root / task / f"{task}_16384_100_train.jsonl").write_text(ROW * 3)
    for task in test:
        (root / task).mkdir(parents=True)
        for seed in DEFAULT_SEEDS:
            for split in ("train", "dev", "test"):
                (root / task / split_name(task, 16, seed, split)).write_text(ROW * 2)
    partition = root.parent / "mine.json"
    partition.write_text(json.dumps({"train": list(train), "test": list(test)}))
    return partition


def check(*args):
    return CliRunner().invoke(cli, ["data", "metaicl", *map(str, args)])


def test_a_complete_folder_passes(tmp_path):
    partition = make_folder(tmp_path / "data")
    result = check(tmp_path / "data", "--partition", partition)
    assert result.exit_code == 0, result.output
    assert "mine: complete" in result.output and "2 meta-train, 2 meta-test tasks" in result.output


def test_missing_tasks_seeds_and_splits_are_named_with_exit_2(tmp_path):
    data = tmp_path / "data"
    partition = make_folder(data, train=("train_a", "train_b", "train_gone"), test=("test_c", "test_d", "test_gone"))
    for task in ("train_gone", "test_gone"):
        for f in (data / task).iterdir():
            f.unlink()
        (data / task).rmdir()
    (data / "train_b" / "train_b_16384_100_train.jsonl").unlink()
    for seed in (21, 42):
        for split in ("train", "test"):
            (data / "test_c" / split_name("test_c", 16, seed, split)).unlink()
    (data / "test_c" / split_name("test_c", 16, 13, "test")).unlink()
    (data / "test_d" / split_name("test_d", 16, 87, "train")).write_text("")
    (data / "other_task").mkdir()  # a folder of no task of the partition: not its business
    (data / "test_d" / split_name("test_d", 16, 100, "dev")).unlink()  # the dev split is MetaICL's; nothing reads it

    result = check(data, "--partition", partition)
    assert result.exit_code == 2
    lines = result.output.splitlines()
    assert lines[0].startswith("mine: incomplete")
    assert "  meta-train tasks missing (1): train_gone" in lines
    assert "  meta-test tasks missing (1): test_gone" in lines
    assert "  train_b (meta-train): train_b_16384_100_train.jsonl is missing" in lines
    assert "  test_c (meta-test): seeds 21, 42 missing; seed 13: no test split" in lines
    assert "  test_d (meta-test): test_d_16_87_train.jsonl is empty" in lines
    assert len(lines) == 6  # nothing about train_a, nor about test_d's dev split


def test_a_file_that_holds_no_examples_is_named(tmp_path):
    partition = make_folder(tmp_path / "data")
    (tmp_path / "data" / "train_a" / "train_a_16384_100_train.jsonl").write_text('{"text": "x"}\n')
    result = check(tmp_path / "data", "--partition", partition, "--seeds", "100,13")
    assert result.exit_code == 2
    assert "train_a (meta-train): train_a_16384_100_train.jsonl is not MetaICL examples" in result.output


def test_without_a_partition_all_seven_of_metaicl_are_checked(tmp_path):
    assert set(METAICL_PARTITIONS) < set(list_partitions())
    (tmp_path / "empty").mkdir()
    result = check(tmp_path / "empty")
    assert result.exit_code == 2
    for name in METAICL_PARTITIONS:
        assert f"{name}: incomplete" in result.output
    assert "0 of 7 partitions complete" in result.output
    assert "glue-sst2" in result.output  # a task of class_to_class's meta-train side, named


@pytest.mark.parametrize("args, message", [(["nowhere"], "not a folder"),
                                           (["{tmp}", "--partition", "clas_to_class"], "Did you mean 'class_to_class'"),
                                           (["{tmp}", "--seeds", "13,x"], "not a comma-separated list")])
def test_bad_arguments_exit_2(tmp_path, args, message):
    result = check(*[a.format(tmp=tmp_path) for a in args])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
