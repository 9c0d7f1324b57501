import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from mendctl.data import bigbench
from mendctl.data.bigbench import (
    SDIST_NAME,
    convert_bigbench,
    fetch_bigbench,
    iter_passages,
    list_tasks,
    task_name_from_path,
)

K = 4
SEEDS = (100, 13, 21)
TEST_SIZE = 20
N_ALPHA = 60  # usable examples in task "alpha"
N_SUB = 50  # usable examples in task "group/sub"


def _mc(text: str, gold: str, options: list[str], score: float = 1) -> dict:
    return {"input": text, "target_scores": {o: (score if o == gold else 0) for o in options}}


def _fixture_tasks() -> dict[str, dict]:
    yes_no = ["yes", "no"]
    # the first five inputs are long (passage candidates); trailing spaces get stripped
    alpha = [
        _mc(f"alpha question {i} " + "x" * (250 if i < 5 else 0), yes_no[i % 2], yes_no)
        for i in range(N_ALPHA)
    ]
    alpha[10:10] = [
        _mc(f"alpha other options {i}", "maybe", ["yes", "no", "maybe"]) for i in range(3)
    ]
    alpha[20:20] = [
        {"input": "alpha tie", "target_scores": {"yes": 1, "no": 1}},
        {"input": "alpha all zero", "target_scores": {"yes": 0, "no": 0}},
        {"input": "alpha float tie", "target_scores": {"yes": 0.5, "no": 0.5}},
    ]
    # repeats of "alpha question 7" (gold "no") and "alpha question 8" with other golds
    alpha += [_mc("alpha question 7", "yes", yes_no), _mc(" alpha question 8 ", "no", yes_no)]
    # not multiple choice: ignored by the converter, but still a passage
    alpha += [{"input": "alpha generative " + "y" * 300, "target": "free text"}]
    abc = ["C", "A", "B"]  # option order must be kept, not sorted
    sub = [_mc(f"sub item {i}", abc[i % 3], abc, score=0.7) for i in range(N_SUB)]
    return {
        "alpha/task.json": {"name": "alpha", "examples": alpha},
        "group/task.json": {"name": "group", "description": "parent of subtasks, no examples"},
        "group/sub/task.json": {"name": "sub", "examples": sub},
        "tiny/task.json": {"examples": [_mc(f"tiny {i}", "yes", yes_no) for i in range(2 * K)]},
        "empty/task.json": {"examples": [{"input": "gen only", "target": "x"}]},
    }


@pytest.fixture()
def src(tmp_path) -> Path:
    root = tmp_path / "bigbench"
    for rel, content in _fixture_tasks().items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content))
    return root


@pytest.fixture()
def tarball(tmp_path) -> Path:
    path = tmp_path / SDIST_NAME
    with tarfile.open(path, "w:gz") as tar:
        members = {f"bigbench-1.0.0/bigbench/benchmark_tasks/{rel}": json.dumps(c).encode()
                   for rel, c in _fixture_tasks().items()}
        members["bigbench-1.0.0/setup.py"] = b"print('not a task')\n"
        members["bigbench-1.0.0/bigbench/benchmark_tasks/alpha/README.md"] = b"# alpha\n"
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _convert(src: Path, out: Path, **kw):
    return convert_bigbench(src, out, k=K, seeds=SEEDS, test_size=TEST_SIZE, **kw)


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _inputs(path: Path) -> set[str]:
    return {r["input"] for r in _read(path)}


def _tree(root: Path) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in files}


def test_task_names(src):
    assert task_name_from_path("fact_checker/fever/task.json") == "fact_checker-fever"
    assert task_name_from_path("fact_checker/fever") == "fact_checker-fever"
    assert task_name_from_path("navigate") == "navigate"
    # group/task.json only groups subtasks, so it is not a task of its own
    assert list_tasks(src) == ["alpha", "empty", "group-sub", "tiny"]


def test_files_names_and_split_sizes(src, tmp_path):
    out = tmp_path / "out"
    _convert(src, out)
    assert sorted(p.name for p in out.iterdir()) == ["alpha", "group-sub"]
    for task, n in (("alpha", N_ALPHA), ("group-sub", N_SUB)):
        splits = ("train", "dev", "test")
        expected = {f"{task}_{K}_{s}_{split}.jsonl" for s in SEEDS for split in splits}
        expected.add(f"{task}_16384_100_train.jsonl")
        assert {p.name for p in (out / task).iterdir()} == expected
        n_test = min(TEST_SIZE, n - 2 * K)
        for seed in SEEDS:
            assert len(_read(out / task / f"{task}_{K}_{seed}_train.jsonl")) == K
            assert len(_read(out / task / f"{task}_{K}_{seed}_dev.jsonl")) == K
            assert len(_read(out / task / f"{task}_{K}_{seed}_test.jsonl")) == n_test
        assert len(_read(out / task / f"{task}_16384_100_train.jsonl")) == n - n_test


def test_records_have_metaicl_fields_and_first_example_option_order(src, tmp_path):
    out = tmp_path / "out"
    _convert(src, out)
    records = _read(out / "group-sub" / f"group-sub_{K}_100_test.jsonl")
    assert records
    for record in records:
        assert set(record) == {"task", "input", "output", "options"}
        assert record["task"] == "group-sub"
        assert record["options"] == ["C", "A", "B"]
        assert record["output"] in record["options"]
    d = out / "alpha"
    every = _read(d / "alpha_16384_100_train.jsonl") + _read(d / f"alpha_{K}_100_test.jsonl")
    gold = {r["input"]: r["output"] for r in every}
    assert len(every) == len(gold) == N_ALPHA
    # the first occurrence of a repeated input wins
    assert (gold["alpha question 7"], gold["alpha question 8"]) == ("no", "yes")


def test_test_split_fixed_and_disjoint_from_train_and_dev(src, tmp_path):
    out = tmp_path / "out"
    _convert(src, out)
    for task in ("alpha", "group-sub"):
        d = out / task
        tests = [(d / f"{task}_{K}_{s}_test.jsonl").read_bytes() for s in SEEDS]
        assert len(set(tests)) == 1  # same test split for every seed
        test = _inputs(d / f"{task}_{K}_100_test.jsonl")
        meta_train = _inputs(d / f"{task}_16384_100_train.jsonl")
        assert not test & meta_train
        trains = []
        for seed in SEEDS:
            train = _inputs(d / f"{task}_{K}_{seed}_train.jsonl")
            dev = _inputs(d / f"{task}_{K}_{seed}_dev.jsonl")
            assert len(train) == K and len(dev) == K
            assert not train & dev and not train & test and not dev & test
            assert train | dev <= meta_train
            trains.append(frozenset(train))
        assert len(set(trains)) == len(SEEDS)  # seeds draw different demonstrations


def test_skip_counts_are_exact(src, tmp_path):
    report = _convert(src, tmp_path / "out")
    assert report.tasks["alpha"] == {
        "written": N_ALPHA,
        "skipped_option_set": 3,
        "skipped_no_gold": 3,
        "skipped_duplicate": 2,
        "test": min(TEST_SIZE, N_ALPHA - 2 * K),
    }
    assert report.tasks["group-sub"]["written"] == N_SUB
    assert set(report.skipped_tasks) == {"tiny", "empty"}
    assert "no multiple-choice examples" in report.skipped_tasks["empty"]
    assert "only 8 usable examples" in report.skipped_tasks["tiny"]
    summary = report.summary()
    assert "alpha" in summary and "skipped tiny" in summary
    assert "2 tasks converted, 2 skipped" in summary


def test_per_example_options_keep_each_example_with_its_own(src, tmp_path):
    report = _convert(src, tmp_path / "out", per_example_options=True)
    assert report.tasks["alpha"]["written"] == N_ALPHA + 3 and report.tasks["alpha"]["skipped_option_set"] == 0
    d = tmp_path / "out" / "alpha"
    every = _read(d / "alpha_16384_100_train.jsonl") + _read(d / f"alpha_{K}_100_test.jsonl")
    options = {r["input"]: r["options"] for r in every}
    assert [options[f"alpha other options {i}"] for i in range(3)] == [["yes", "no", "maybe"]] * 3
    assert all(o == ["yes", "no"] for i, o in options.items() if "other options" not in i)
    fixed = tmp_path / "fixed"
    _convert(src, fixed)
    from click.testing import CliRunner
    from mendctl.cli import cli

    result = CliRunner().invoke(cli, ["data", "bigbench", str(src), str(tmp_path / "cli"), f"--k={K}",
                                      "--tasks=alpha", "--per-example-options"])
    assert result.exit_code == 0, result.output
    kept = _read(tmp_path / "cli" / "alpha" / "alpha_16384_100_train.jsonl") + _read(
        tmp_path / "cli" / "alpha" / f"alpha_{K}_100_test.jsonl")
    assert sum(r["options"] == ["yes", "no", "maybe"] for r in kept) == 3
    # a task whose examples share their options comes out byte for byte as before
    assert _tree(tmp_path / "out" / "group-sub") == _tree(fixed / "group-sub")


def test_small_task_test_split_shrinks(src, tmp_path):
    report = convert_bigbench(
        src, tmp_path / "out", tasks=["alpha"], k=K, seeds=SEEDS, test_size=1000
    )
    assert report.tasks["alpha"]["test"] == N_ALPHA - 2 * K


def test_deterministic_and_no_temp_files(src, tmp_path):
    _convert(src, tmp_path / "a")
    _convert(src, tmp_path / "b")
    first, second = _tree(tmp_path / "a"), _tree(tmp_path / "b")
    assert first == second
    assert not [name for name in first if name.endswith(".tmp")]
    _convert(src, tmp_path / "a")  # rewriting in place gives the same bytes
    assert _tree(tmp_path / "a") == first


def test_tarball_matches_directory(src, tarball, tmp_path):
    assert list_tasks(tarball) == list_tasks(src)
    from_dir = _convert(src, tmp_path / "from_dir")
    from_tar = _convert(tarball, tmp_path / "from_tar")
    assert from_tar.tasks == from_dir.tasks
    assert _tree(tmp_path / "from_tar") == _tree(tmp_path / "from_dir")


@pytest.mark.parametrize("name", ["group/sub", "group-sub"])
def test_task_filter_accepts_both_name_forms(src, tmp_path, name):
    report = _convert(src, tmp_path / "out", tasks=[name])
    assert list(report.tasks) == ["group-sub"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["group-sub"]


def test_unknown_task_suggests_closest(src, tmp_path):
    with pytest.raises(ValueError, match="Did you mean 'alpha'"):
        _convert(src, tmp_path / "out", tasks=["alpah"])
    assert not (tmp_path / "out").exists()


def test_invalid_settings(src, tmp_path):
    with pytest.raises(ValueError, match="k must be"):
        convert_bigbench(src, tmp_path / "out", k=0)
    with pytest.raises(ValueError, match="seeds"):
        convert_bigbench(src, tmp_path / "out", seeds=(1, 1))
    with pytest.raises(ValueError, match="expected a directory"):
        convert_bigbench(tmp_path / "missing", tmp_path / "out")


def test_iter_passages(src, tarball):
    passages = list(iter_passages(src, exclude_tasks={"group/sub"}))
    assert passages == list(iter_passages(src, exclude_tasks={"group-sub"}))
    assert all(len(p) >= 200 for p in passages)
    # five long alpha inputs plus the long generative one; short inputs are left out
    assert len(passages) == 6
    assert passages[0].startswith("alpha question 0")
    assert not any(p.startswith("alpha") for p in iter_passages(src, exclude_tasks={"alpha"}))
    assert list(iter_passages(tarball, exclude_tasks={"group-sub"})) == passages
    short = list(iter_passages(src, exclude_tasks={"alpha", "tiny", "empty"}, min_chars=1))
    assert short == [f"sub item {i}" for i in range(N_SUB)]
    with pytest.raises(ValueError, match="Did you mean 'alpha'"):
        list(iter_passages(src, exclude_tasks={"alpah"}))


def test_iter_passages_leaves_out_the_families_of_excluded_tasks(tmp_path):
    # multiemo-all_sentence_en holds multiemo-products_sentence_en's sentences: holding out a task
    # must hold out its siblings' text too
    tasks = {"fam/task.json": {"name": "fam"}, "solo/task.json": {"name": "solo"}}
    for name in ("fam/a", "fam/b", "solo"):
        tasks[f"{name}/task.json"] = {"examples": [_mc(f"{name} text " + "z" * 250, "yes", ["yes", "no"])]}
    for rel, content in tasks.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(json.dumps(content))
    starts = lambda exclude: [p.split(" ")[0] for p in iter_passages(tmp_path, exclude_tasks=exclude)]
    assert starts(set()) == ["fam/a", "fam/b", "solo"]
    assert starts({"fam-a"}) == ["solo"]
    assert starts({"solo"}) == ["fam/a", "fam/b"]


def test_fetch_returns_cached_tarball_without_pip(tmp_path, monkeypatch):
    (tmp_path / SDIST_NAME).write_bytes(b"cached")

    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run when the tarball is cached")

    monkeypatch.setattr(bigbench.subprocess, "run", no_pip)
    assert fetch_bigbench(tmp_path) == tmp_path / SDIST_NAME


def test_fetch_runs_pip_download_and_reports_failure(tmp_path, monkeypatch):
    calls = []

    def failing_pip(cmd, **kwargs):
        calls.append(cmd)
        message = "ERROR: No matching distribution"
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr=message)

    monkeypatch.setattr(bigbench.subprocess, "run", failing_pip)
    with pytest.raises(RuntimeError, match="No matching distribution"):
        fetch_bigbench(tmp_path / "cache")
    (cmd,) = calls
    assert cmd[1:4] == ["-m", "pip", "download"] and "install" not in cmd
    assert "--no-deps" in cmd and "bigbench==1.0.0" in cmd
    assert cmd[cmd.index("-d") + 1] == str(tmp_path / "cache")


def test_fetch_success_returns_downloaded_path(tmp_path, monkeypatch):
    def fake_pip(cmd, **kwargs):
        Path(cmd[cmd.index("-d") + 1], SDIST_NAME).write_bytes(b"sdist")
        return subprocess.CompletedProcess(cmd, 0, stdout="Saved", stderr="")

    monkeypatch.setattr(bigbench.subprocess, "run", fake_pip)
    assert fetch_bigbench(tmp_path).read_bytes() == b"sdist"


def test_iter_passages_limit_spreads_over_tasks(src):
    everything = list(iter_passages(src, exclude_tasks={"group-sub"}))
    # three eligible tasks (alpha, tiny, empty): a limit of 6 lets each give at most 2
    assert list(iter_passages(src, exclude_tasks={"group-sub"}, limit=6)) == everything[:2]
    assert list(iter_passages(src, exclude_tasks={"group-sub"}, limit=1)) == everything[:1]
    assert len(list(iter_passages(src, exclude_tasks={"group-sub"}, limit=100))) == len(everything)


def _recipe(tmp_path: Path, src: Path, *overrides: str, train=("alpha",)):
    from mendctl.core.config import load_recipe

    partition = tmp_path / "p.json"
    partition.write_text(json.dumps({"train": list(train), "test": ["group-sub"]}))
    root = Path(__file__).resolve().parents[1]
    return load_recipe(root / "recipes" / "tiny" / "gpt2.yaml", [
        f"output_dir={tmp_path / 'run'}", "tasks.data_dir=null", f"tasks.bigbench={src}",
        f"tasks.partition={partition}", f"tasks.k={K}", *overrides])


def _console():
    from rich.console import Console

    return Console(file=io.StringIO(), width=200)


def test_prepare_converts_bigbench_once_and_again_for_new_seeds(src, tmp_path):
    from mendctl.data.prepare import prepare
    from mendctl.data.workspace import data_dir

    recipe = _recipe(tmp_path, src, "tasks.seeds=[100]")
    console = _console()
    prepare(recipe, "eval", console=console)
    assert f"converting BIG-bench from {src}" in console.file.getvalue()
    out = data_dir(recipe)
    assert (out / "group-sub" / f"group-sub_{K}_100_test.jsonl").is_file()
    assert (out / "alpha" / "alpha_16384_100_train.jsonl").is_file()
    assert not (out / "group-sub" / f"group-sub_{K}_13_train.jsonl").exists()
    again = _console()
    prepare(recipe, "eval", console=again)
    assert again.file.getvalue() == ""  # made once: nothing to do, nothing said
    more = _recipe(tmp_path, src, "tasks.seeds=[100,13]")
    prepare(more, "distill", console=_console())
    assert data_dir(more) == out
    assert (out / "group-sub" / f"group-sub_{K}_13_train.jsonl").is_file()


def test_a_recipe_training_on_all_tasks_converts_every_task_once(src, tmp_path, monkeypatch):
    import mendctl.data.bigbench as bigbench
    from mendctl.data.prepare import prepare
    from mendctl.data.workspace import data_dir

    asked, real = [], bigbench.convert_bigbench
    monkeypatch.setattr(bigbench, "convert_bigbench", lambda *a, **kw: asked.append(kw["tasks"]) or real(*a, **kw))
    prepare(_recipe(tmp_path, src, "tasks.seeds=[100]"), "finetune", console=_console())
    assert asked == [["alpha", "group-sub"]]  # the partition's tasks only
    everything = _recipe(tmp_path, src, "tasks.seeds=[100]", "finetune.train_tasks=all")
    prepare(everything, "finetune", console=_console())
    out = data_dir(everything)
    assert asked[1:] == [None] and (out / ".all-tasks-converted").is_file()  # every task, once
    prepare(everything, "finetune", console=_console())
    assert len(asked) == 2


def test_per_example_options_convert_into_a_folder_of_their_own(src, tmp_path):
    from mendctl.core.config import RecipeError
    from mendctl.data.prepare import prepare
    from mendctl.data.workspace import data_dir

    fixed = _recipe(tmp_path, src, "tasks.seeds=[100]")
    varied = _recipe(tmp_path, src, "tasks.seeds=[100]", "tasks.bigbench_options=per_example")
    for recipe in (fixed, varied):
        prepare(recipe, "finetune", console=_console())
    assert data_dir(varied) == tmp_path / "run" / "data-per-example-options" != data_dir(fixed)
    counts = {len(r["options"]) for r in _read(data_dir(varied) / "alpha" / "alpha_16384_100_train.jsonl")
              + _read(data_dir(varied) / "alpha" / f"alpha_{K}_100_test.jsonl")}
    assert counts == {2, 3}
    assert {len(r["options"]) for r in _read(data_dir(fixed) / "alpha" / "alpha_16384_100_train.jsonl")} == {2}
    with pytest.raises(RecipeError, match="bigbench_options"):
        _recipe(tmp_path, src, "tasks.bigbench=null", f"tasks.data_dir={tmp_path}",
                "tasks.bigbench_options=per_example")


def test_stage1_passages_leave_out_the_validation_tasks_too(src, tmp_path):
    from mendctl.data.prepare import prepare
    from mendctl.data.workspace import passages_file

    base = ["pretrain.text=null", "pretrain.bigbench_passages=50"]
    plain, held = (_recipe(tmp_path, src, *base, *more, train=("alpha", "tiny"))
                   for more in ([], ["tasks.validation=[alpha]"]))
    console = _console()
    for recipe in (plain, held):
        prepare(recipe, "pretrain", console=console)
    assert console.file.getvalue().count("stage-1 passages") == 2
    assert passages_file(plain) != passages_file(held)  # one file per set of tasks left out, not one per count
    assert any(json.loads(line)["text"].startswith("alpha") for line in passages_file(plain).read_text().splitlines())
    assert not any(json.loads(line)["text"].startswith("alpha") for line in passages_file(held).read_text().splitlines())


def test_looking_up_a_path_makes_nothing_and_says_what_is_missing(src, tmp_path, monkeypatch):
    import mendctl.data.bigbench as bigbench
    from mendctl.data.metaicl import DataError
    from mendctl.data.workspace import data_dir, passages_file

    monkeypatch.setattr(bigbench, "convert_bigbench", lambda *a, **kw: pytest.fail("a lookup converted"))
    monkeypatch.setattr(bigbench, "iter_passages", lambda *a, **kw: pytest.fail("a lookup extracted"))
    monkeypatch.setattr(bigbench, "fetch_bigbench", lambda *a, **kw: pytest.fail("a lookup fetched"))
    recipe = _recipe(tmp_path, src, "pretrain.text=null", "pretrain.bigbench_passages=50")
    with pytest.raises(DataError, match="BIG-bench is not converted for this recipe yet.*prepare"):
        data_dir(recipe)
    with pytest.raises(DataError, match="passages are not extracted yet.*prepare"):
        passages_file(recipe)
    fetching = _recipe(tmp_path, src, "tasks.bigbench=fetch")
    with pytest.raises(DataError, match="not converted"):
        data_dir(fetching)
    assert not (tmp_path / "run").exists()


def test_prepare_makes_only_what_the_command_reads(src, tmp_path):
    from mendctl.data.prepare import reads

    recipe = _recipe(tmp_path, src, "pretrain.text=null", "pretrain.bigbench_passages=50")
    assert reads(recipe, "pretrain") == {"passages"}
    assert reads(recipe, "teacher", "pretrain") == {"passages"}
    assert reads(recipe, "finetune") == reads(recipe, "teacher", "finetune") == {"tasks"}
    assert reads(recipe, "distill") == reads(recipe, "eval") == {"tasks"}
    assert reads(recipe, "export") == set()
    curves = _recipe(tmp_path, src, "pretrain.eval_every=5", "tasks.validation=[alpha]", train=("alpha", "tiny"))
    assert reads(curves, "pretrain") == {"tasks"}  # the curves score the validation tasks
    assert reads(curves, "teacher", "pretrain") == set()


def test_a_task_the_conversion_skips_is_named_with_the_reason(src, tmp_path):
    from mendctl.data.metaicl import DataError
    from mendctl.data.prepare import prepare

    recipe = _recipe(tmp_path, src, "tasks.seeds=[100]", train=("alpha", "empty"))
    with pytest.raises(DataError, match=r"empty_16384_100_train.jsonl: the BIG-bench conversion wrote no such "
                                        r"file.*empty: "):
        prepare(recipe, "finetune", console=_console())


def test_fetch_takes_the_copy_named_by_the_environment_without_pip(tmp_path, monkeypatch):
    local = tmp_path / "bigbench"
    local.mkdir()
    monkeypatch.setattr(bigbench.subprocess, "run", lambda *a, **kw: pytest.fail("pip ran despite a local copy"))
    monkeypatch.setenv("MENDCTL_BIGBENCH", str(local))
    assert fetch_bigbench(tmp_path / "cache") == local
    monkeypatch.setenv("MENDCTL_BIGBENCH", str(tmp_path / "absent"))
    with pytest.raises(bigbench.FetchError, match="MENDCTL_BIGBENCH=.*absent: no such file"):
        fetch_bigbench(tmp_path / "cache")
