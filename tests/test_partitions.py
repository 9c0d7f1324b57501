import json
from pathlib import Path

import pytest

from mendctl.data.bigbench import list_tasks, task_name_from_path
from mendctl.core.partitions import TASK_TYPES, Partition, list_partitions, load_partition

METAICL = [
    "class_to_class",
    "hr_to_lr",
    "non_class_to_class",
    "non_nli_to_nli",
    "non_paraphrase_to_paraphrase",
    "non_qa_to_qa",
    "qa_to_qa",
]
# The shared data folder sits beside the repository (../shared); absent elsewhere, its tests skip.
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_list_partitions_is_sorted_and_complete():
    names = list_partitions()
    assert names == sorted(names)
    assert set(names) == set(METAICL) | {"bb_class_to_class", "bb_fresh"}


@pytest.mark.parametrize("name", METAICL + ["bb_class_to_class", "bb_fresh"])
def test_shipped_partition_is_consistent(name):
    part = load_partition(name)
    assert isinstance(part, Partition) and part.name == name
    assert part.train and part.test
    assert not set(part.train) & set(part.test)
    assert set(part.task_types) == set(part.train) | set(part.test)
    assert set(part.task_types.values()) <= set(TASK_TYPES)


def test_metaicl_facts():
    hr = load_partition("hr_to_lr")
    assert (len(hr.train), len(hr.test)) == (61, 26)
    assert hr.is_classification("sick") and not hr.is_classification("ai2_arc")
    # MetaICL's config lists sick on both sides of non_nli_to_nli; it is kept as a test task.
    nli = load_partition("non_nli_to_nli")
    assert "sick" in nli.test and "sick" not in nli.train
    cls = load_partition("class_to_class")
    assert all(cls.is_classification(t) for t in cls.test)
    qa = load_partition("qa_to_qa")
    assert not any(qa.is_classification(t) for t in qa.test)


def test_is_classification_rejects_foreign_task():
    with pytest.raises(KeyError, match="not part of partition"):
        load_partition("hr_to_lr").is_classification("no_such_task")


@pytest.mark.skipif(not (SHARED / "partitions").is_dir(), reason="shared partitions absent")
def test_bb_partition_uses_converter_names():
    shipped = load_partition("bb_class_to_class")
    source = json.loads((SHARED / "partitions" / "bb_class_to_class.json").read_text())
    assert list(shipped.train) == [task_name_from_path(t) for t in source["train"]]
    assert list(shipped.test) == [task_name_from_path(t) for t in source["test"]]
    assert "fact_checker-fever" in shipped.train
    assert all(shipped.is_classification(t) for t in shipped.task_types)


@pytest.mark.skipif(not (SHARED / "bigbench").is_dir(), reason="shared BIG-bench data absent")
def test_bb_partition_names_exist_in_converted_data():
    available = set(list_tasks(SHARED / "bigbench"))
    part = load_partition("bb_class_to_class")
    assert set(part.train) | set(part.test) <= available


def test_unknown_name_suggests_closest():
    with pytest.raises(ValueError) as err:
        load_partition("hr_to_rl")
    message = str(err.value)
    assert "Did you mean 'hr_to_lr'" in message
    assert "qa_to_qa" in message  # lists shipped names


def test_user_file(tmp_path):
    path = tmp_path / "mine.json"
    content = {"train": ["a", "b"], "test": ["c"], "task_types": {"c": "classification"}}
    path.write_text(json.dumps(content))
    part = load_partition(str(path))
    assert part.name == "mine"
    assert part.train == ("a", "b") and part.test == ("c",)
    assert part.is_classification("c")
    assert part.task_types["a"] == "multi-choice"  # unlisted tasks default to accuracy
    assert load_partition(path) == part  # a Path works too


def test_user_file_without_task_types(tmp_path):
    path = tmp_path / "plain.json"
    path.write_text(json.dumps({"train": ["a"], "test": ["b"]}))
    assert load_partition(path).task_types == {"a": "multi-choice", "b": "multi-choice"}


@pytest.mark.parametrize(
    "content, problem",
    [
        ({"train": ["a"]}, "missing required key 'test'"),
        ({"train": "a", "test": ["b"]}, "'train' must be a list"),
        ({"train": ["a", "b"], "test": ["b"]}, "in both 'train' and 'test'"),
        ({"train": [], "test": ["b"]}, "'train' is empty"),
        ({"train": ["a", "a"], "test": ["b"]}, "more than once"),
        ({"train": ["a"], "test": ["b"], "task_types": {"b": "regression"}}, "must be one of"),
        (
            {"train": ["a"], "test": ["b"], "task_types": {"bb": "classification"}},
            "not in train/test",
        ),
        (["a", "b"], "expected a JSON object"),
    ],
)
def test_malformed_user_file_names_file_and_problem(tmp_path, content, problem):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError) as err:
        load_partition(str(path))
    assert str(path) in str(err.value)
    assert problem in str(err.value)


def test_invalid_json_and_missing_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON") as err:
        load_partition(path)
    assert str(path) in str(err.value)
    with pytest.raises(ValueError, match="does not exist"):
        load_partition(tmp_path / "absent.json")
