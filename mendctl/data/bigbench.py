"""Convert BIG-bench JSON tasks into the MetaICL data layout.

Source: a directory tree holding ``<task>/task.json`` files (possibly nested, e.g.
``fact_checker/fever/task.json``) or the PyPI sdist ``bigbench-1.0.0.tar.gz``, read in place.
A task is named by its path under the root with "/" replaced by "-"
(``fact_checker/fever`` -> ``fact_checker-fever``).

Output, per task, under ``OUT/{task}/``, one JSON object per line
``{"task", "input", "output", "options"}``:

* ``{task}_{k}_{seed}_train.jsonl`` / ``_dev.jsonl``: k examples each, drawn with ``seed``;
* ``{task}_{k}_{seed}_test.jsonl``: one test split shared by every seed (same content);
* ``{task}_16384_100_train.jsonl``: every non-test example (at most 16384), the data used
  when the task is a META-TRAIN task (MetaICL's naming). Meta-test tasks only use the
  k-shot files; their test examples never appear in this file.

Only multiple-choice examples (with ``target_scores``) are used. The task's options are those
of its first multiple-choice example, in that order. Examples are skipped (and counted) when
their option set differs, when they have no unique gold option (no positive maximum score, or
a tie at the maximum), or when their input repeats an earlier example's input (so a test input
can never also be a demonstration). Inputs are used as written (whitespace-stripped), without
BIG-bench's task prefix or appended choices.

With ``per_example_options`` an example whose option set differs is kept with its own options
(in its ``target_scores`` order) instead: the tasks whose every question has its own answers
(147 of the sdist's 320 multiple-choice tasks) become usable as meta-train data.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from rich.progress import track

from ..core.bounded import loads_json
from ..core.partitions import check_task_name, family
from ..core.suggest import did_you_mean
from .metaicl import DEFAULT_K, DEFAULT_SEEDS, DataError, META_TRAIN_FILE, META_TRAIN_SEED, META_TRAIN_SIZE, split_name, \
    task_file

# 200 test examples keep a 5-seed x 7-task evaluation affordable while macro-F1 stays
# meaningful; pass a larger test_size for final numbers.
DEFAULT_TEST_SIZE = 200
# The test split must not depend on the demonstration seeds, so it has its own fixed seed.
TEST_SPLIT_SEED = 0

BIGBENCH_VERSION = "1.0.0"
_OLD_PIP = "23.2.1"
SDIST_NAME = f"bigbench-{BIGBENCH_VERSION}.tar.gz"
_SDIST_TASKS_DIR = "bigbench/benchmark_tasks/"
_TASK_FILE = "task.json"

Reader = Callable[[], bytes]


# ---------------------------------------------------------------- task names and sources


def task_name_from_path(path: str) -> str:
    """Task name for a path under the tasks root: ``a/b/task.json`` or ``a/b`` -> ``a-b``."""
    parts = PurePosixPath(path.strip("/")).parts
    if parts and parts[-1] == _TASK_FILE:
        parts = parts[:-1]
    return "-".join(parts)


def list_tasks(src: Path) -> list[str]:
    """Names of the tasks found in ``src`` (directory or sdist tarball), sorted."""
    with _task_files(Path(src)) as files:
        return sorted(files)


@contextmanager
def _task_files(src: Path) -> Iterator[dict[str, Reader]]:
    """Map task name -> reader of its task.json bytes, in a deterministic source order."""
    if src.is_dir():
        yield _dir_task_files(src)
    elif src.is_file() and tarfile.is_tarfile(src):
        with tarfile.open(src, "r:*") as tar:
            yield _tar_task_files(tar)
    else:
        raise ValueError(
            f"{src}: expected a directory of */task.json or a BIG-bench sdist tarball"
        )


def _dir_task_files(root: Path) -> dict[str, Reader]:
    rel_paths = {p.relative_to(root).as_posix(): p for p in root.rglob(_TASK_FILE)}
    return {
        name: rel_paths[rel].read_bytes
        for name, rel in _named_task_paths(sorted(rel_paths)).items()
    }


def _tar_task_files(tar: tarfile.TarFile) -> dict[str, Reader]:
    # Archive order, not sorted order: a gzip stream only seeks forward cheaply.
    members: dict[str, tarfile.TarInfo] = {}
    for member in tar.getmembers():
        _, sep, rel = member.name.partition(_SDIST_TASKS_DIR)
        if sep and member.isfile() and PurePosixPath(rel).name == _TASK_FILE:
            members[rel] = member

    def reader(member: tarfile.TarInfo) -> Reader:
        def read() -> bytes:
            handle = tar.extractfile(member)
            assert handle is not None  # isfile() was checked above
            return handle.read()

        return read

    return {name: reader(members[rel]) for name, rel in _named_task_paths(list(members)).items()}


def _named_task_paths(rel_paths: list[str]) -> dict[str, str]:
    """Name each task.json path, dropping parent tasks that only group subtasks."""
    dirs = [PurePosixPath(rel).parent for rel in rel_paths]
    named: dict[str, str] = {}
    for rel, directory in zip(rel_paths, dirs):
        if directory == PurePosixPath("."):
            continue  # a task.json at the root has no name
        if any(other != directory and directory in other.parents for other in dirs):
            continue  # e.g. cs_algorithms/task.json next to cs_algorithms/*/task.json
        name = task_name_from_path(rel)
        if name in named:
            raise ValueError(f"task paths {named[name]!r} and {rel!r} both map to name {name!r}")
        named[name] = rel
    return named


def _resolve_names(requested: Iterable[str], available: Iterable[str], what: str) -> list[str]:
    """Normalise names given in either form and reject unknown ones with a suggestion."""
    known = set(available)
    resolved, errors = [], []
    for raw in requested:
        name = task_name_from_path(raw)
        if name in known:
            resolved.append(name)
            continue
        hint = did_you_mean(name, known).strip()
        errors.append(f"{raw!r} ({hint})" if hint else repr(raw))
    if errors:
        raise ValueError(f"unknown BIG-bench {what}: {', '.join(errors)}")
    return list(dict.fromkeys(resolved))


# ---------------------------------------------------------------- examples


@dataclass(frozen=True)
class _Example:
    input: str
    output: str
    options: list[str]


@dataclass
class _TaskExamples:
    options: list[str]
    examples: list[_Example]
    skipped_option_set: int = 0
    skipped_no_gold: int = 0
    skipped_duplicate: int = 0


def _unique_gold(scores: dict[str, Any]) -> str | None:
    best = max(scores.values())
    winners = [option for option, score in scores.items() if score == best]
    return winners[0] if best > 0 and len(winners) == 1 else None


def _task_json(raw: bytes, where: str) -> dict[str, Any]:
    """A task.json's data, checked as far as the conversion reads it."""
    try:
        data = loads_json(raw.decode("utf-8"), where)
    except UnicodeDecodeError:
        raise DataError(f"{where}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: malformed JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(data, dict) or not isinstance(data.get("examples", []), list) or not all(
            isinstance(ex, dict) for ex in data.get("examples", [])):
        raise DataError(f"{where}: not a BIG-bench task (a JSON object whose examples are a list of objects)")
    return data


def _usable_examples(data: dict[str, Any], per_example_options: bool = False) -> _TaskExamples:
    multiple_choice = [
        ex
        for ex in data.get("examples", [])
        if isinstance(ex.get("target_scores"), dict) and ex["target_scores"]
    ]
    options = list(multiple_choice[0]["target_scores"]) if multiple_choice else []
    result = _TaskExamples(options=options, examples=[])
    seen_inputs: set[str] = set()
    for ex in multiple_choice:
        scores = ex["target_scores"]
        shared = set(scores) == set(options)
        if not shared and not per_example_options:
            result.skipped_option_set += 1
            continue
        gold = _unique_gold(scores)
        if gold is None:
            result.skipped_no_gold += 1
            continue
        text = str(ex["input"]).strip()
        if text in seen_inputs:
            result.skipped_duplicate += 1
            continue
        seen_inputs.add(text)
        # The task's order where the set is the task's: one label order for every line, as before.
        own = options if shared else list(scores)
        result.examples.append(_Example(text, gold, own))
    return result


# ---------------------------------------------------------------- splits and writing


@dataclass(frozen=True)
class _Splits:
    test: list[int]
    pool: list[int]
    per_seed: dict[int, tuple[list[int], list[int]]]  # seed -> (train, dev)


def _make_splits(n: int, k: int, seeds: Sequence[int], test_size: int) -> _Splits:
    n_test = min(test_size, n - 2 * k)
    test = sorted(random.Random(TEST_SPLIT_SEED).sample(range(n), n_test))
    test_set = set(test)
    pool = [i for i in range(n) if i not in test_set]
    per_seed = {}
    for seed in seeds:
        chosen = random.Random(seed).sample(pool, 2 * k)
        per_seed[seed] = (chosen[:k], chosen[k:])
    return _Splits(test=test, pool=pool, per_seed=per_seed)


def _records(task: str, examples: list[_Example], idx: Iterable[int]) -> list[str]:
    lines = []
    for i in idx:
        record = {"task": task, "input": examples[i].input, "output": examples[i].output,
                  "options": examples[i].options}
        lines.append(json.dumps(record, ensure_ascii=False))
    return lines


def _write_lines_atomic(path: Path, lines: list[str]) -> None:
    # A unique temp name in the target directory makes os.replace atomic and lets two
    # conversions into the same tree never see each other's half-written files.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            handle.write("".join(line + "\n" for line in lines))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_task(out: Path, task: str, found: _TaskExamples, splits: _Splits, k: int) -> None:
    task_dir = out / task
    task_dir.mkdir(parents=True, exist_ok=True)
    exs = found.examples
    test_lines = _records(task, exs, splits.test)
    for seed, (train, dev) in splits.per_seed.items():
        _write_lines_atomic(task_dir / split_name(task, k, seed, "train"), _records(task, exs, train))
        _write_lines_atomic(task_dir / split_name(task, k, seed, "dev"), _records(task, exs, dev))
        _write_lines_atomic(task_dir / split_name(task, k, seed, "test"), test_lines)
    meta_train = list(splits.pool)
    random.Random(META_TRAIN_SEED).shuffle(meta_train)
    _write_lines_atomic(
        task_file(out, task, META_TRAIN_FILE),
        _records(task, exs, meta_train[:META_TRAIN_SIZE]),
    )


# ---------------------------------------------------------------- public conversion API


@dataclass
class ConversionReport:
    """What a conversion wrote and skipped.

    ``tasks[task]`` holds ``written`` (examples used: test split plus non-test pool),
    ``skipped_option_set``, ``skipped_no_gold``, ``skipped_duplicate`` and ``test`` (test
    split size). ``skipped_tasks[task]`` gives the reason a task produced no files.
    """

    out: Path
    k: int
    seeds: tuple[int, ...]
    tasks: dict[str, dict[str, int]] = field(default_factory=dict)
    skipped_tasks: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        cols = ("written", "test", "skipped_option_set", "skipped_no_gold", "skipped_duplicate")
        heads = ("used", "test", "opt-set", "no-gold", "dup")
        width = max([len("task"), *(len(t) for t in self.tasks)])
        lines = [
            f"BIG-bench -> {self.out} (k={self.k}, seeds {','.join(map(str, self.seeds))})",
            "task".ljust(width) + "".join(h.rjust(9) for h in heads),
        ]
        for task, counts in self.tasks.items():
            lines.append(task.ljust(width) + "".join(str(counts[c]).rjust(9) for c in cols))
        totals = {c: sum(counts[c] for counts in self.tasks.values()) for c in cols}
        lines.append("total".ljust(width) + "".join(str(totals[c]).rjust(9) for c in cols))
        lines.append(f"{len(self.tasks)} tasks converted, {len(self.skipped_tasks)} skipped")
        lines.extend(f"skipped {task}: {why}" for task, why in self.skipped_tasks.items())
        return "\n".join(lines)


def _skip_reason(found: _TaskExamples, k: int) -> str | None:
    counts = (
        f"{found.skipped_option_set} option-set, {found.skipped_no_gold} no-gold, "
        f"{found.skipped_duplicate} duplicate examples skipped"
    )
    if not found.options:
        return "no multiple-choice examples"
    if not found.examples:
        return f"no usable examples ({counts})"
    if len(found.examples) <= 2 * k:
        return f"only {len(found.examples)} usable examples, need more than 2k={2 * k} ({counts})"
    return None


def _check_settings(k: int, seeds: Sequence[int], test_size: int) -> tuple[int, ...]:
    seeds = tuple(seeds)
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be a non-empty list of distinct integers, got {seeds}")
    if test_size < 1:
        raise ValueError(f"test_size must be at least 1, got {test_size}")
    return seeds


def convert_bigbench(
    src: Path,
    out: Path,
    tasks: list[str] | None = None,
    k: int = DEFAULT_K,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    test_size: int = DEFAULT_TEST_SIZE,
    progress: bool = False,
    per_example_options: bool = False,
) -> ConversionReport:
    """Convert BIG-bench tasks from ``src`` into MetaICL-layout JSONL files under ``out``.

    ``tasks`` filters by name, written either way ("fact_checker/fever" or
    "fact_checker-fever"); an unknown name raises ``ValueError``. The test split holds
    ``min(test_size, n - 2k)`` of a task's n usable examples, chosen with a fixed seed and
    shared by all seeds; per seed, train and dev (k each, disjoint) come from the rest.
    Tasks with at most 2k usable examples are skipped and reported. ``per_example_options``
    keeps the examples whose options differ from the task's first, each with its own. The
    output is byte-identical for identical inputs and settings.
    """
    seeds = _check_settings(k, seeds, test_size)
    out = Path(out)
    results: dict[str, dict[str, int]] = {}
    skipped: dict[str, str] = {}
    with _task_files(Path(src)) as files:
        if not files:
            raise DataError(f"{src}: no BIG-bench task in it (no <task>/task.json below it); give the "
                            "benchmark_tasks folder, or the sdist")
        wanted = set(_resolve_names(tasks, files, "task") if tasks is not None else files)
        selected = [name for name in files if name in wanted]
        for name in track(selected, description="BIG-bench", disable=not progress):
            check_task_name(name, f"{src}: task folder")
            found = _usable_examples(_task_json(files[name](), f"{src}: {name}/{_TASK_FILE}"), per_example_options)
            reason = _skip_reason(found, k)
            if reason:
                skipped[name] = reason
                continue
            splits = _make_splits(len(found.examples), k, seeds, test_size)
            _write_task(out, name, found, splits, k)
            results[name] = {
                "written": len(found.examples),
                "skipped_option_set": found.skipped_option_set,
                "skipped_no_gold": found.skipped_no_gold,
                "skipped_duplicate": found.skipped_duplicate,
                "test": len(splits.test),
            }
    if not results:
        raise DataError(f"{src}: none of its {len(selected)} task(s) could be converted: "
                        + "; ".join(f"{t}: {why}" for t, why in sorted(skipped.items())))
    return ConversionReport(
        out=out,
        k=k,
        seeds=seeds,
        tasks=dict(sorted(results.items())),
        skipped_tasks=dict(sorted(skipped.items())),
    )


def iter_passages(src: Path, exclude_tasks: set[str], min_chars: int = 200, limit: int | None = None
                  ) -> Iterator[str]:
    """Yield plain-text passages for stage-1 pretraining on a machine without other text.

    Passages are example inputs of at least ``min_chars`` characters (multiple-choice or
    not) from every task in ``src`` except ``exclude_tasks`` and every other task of their
    families (names in either form; unknown names raise ``ValueError``, since a typo would
    leak a meta-test task's text into pretraining). A sibling is left out too because its
    inputs can be the held-out task's own: multiemo-all_sentence_en holds the sentences of
    multiemo-products_sentence_en. Exact repeats are yielded once. Order is deterministic: tasks in source
    order (sorted for a directory, archive order for the tarball), examples in file order.
    With ``limit``, at most that many passages, at most limit / (number of tasks) from each
    task (rounded up), so that a few huge tasks do not crowd out the rest.
    """
    with _task_files(Path(src)) as files:
        families = {family(name) for name in _resolve_names(exclude_tasks, files, "task to exclude")}
        names = [name for name in files if family(name) not in families]
        quota = -(-limit // max(1, len(names))) if limit else None
        seen: set[str] = set()
        for name in names:
            taken = 0
            for ex in _task_json(files[name](), f"{src}: {name}/{_TASK_FILE}").get("examples", []):
                text = str(ex.get("input", "")).strip()
                if len(text) >= min_chars and text not in seen:
                    seen.add(text)
                    yield text
                    taken += 1
                    if limit and len(seen) >= limit:
                        return
                    if quota and taken >= quota:
                        break


class FetchError(RuntimeError):
    pass


def _run_old_pip(args: list[str], cache_dir: Path) -> subprocess.CompletedProcess:
    wheels = cache_dir / ".pip"
    got = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", f"pip=={_OLD_PIP}", "-d", str(wheels)],
                         capture_output=True, text=True)
    if got.returncode != 0:
        return got
    wheel = next(wheels.glob(f"pip-{_OLD_PIP}-*.whl"))
    return subprocess.run([sys.executable, str(wheel / "pip"), *args], capture_output=True, text=True)


LOCAL_ENV = "MENDCTL_BIGBENCH"


def fetch_bigbench(cache_dir: Path) -> Path:
    """Return the path of the BIG-bench sdist in ``cache_dir``, downloading it if absent.

    Runs ``pip download --no-deps bigbench==1.0.0`` (the package is never installed).
    Raises ``FetchError`` with pip's output when the download fails.
    Where the environment variable ``MENDCTL_BIGBENCH`` names a copy already on disk (a folder of
    task.json files or the sdist tarball) that copy is returned and nothing is downloaded: a machine
    whose package index lacks the sdist still runs every recipe that says ``fetch``.
    """
    if local := os.environ.get(LOCAL_ENV):
        if not Path(local).exists():
            raise FetchError(f"{LOCAL_ENV}={local}: no such file or folder (a BIG-bench task folder or the sdist)")
        return Path(local)
    cache_dir = Path(cache_dir)
    tarball = cache_dir / SDIST_NAME
    if tarball.is_file():
        return tarball
    cache_dir.mkdir(parents=True, exist_ok=True)
    args = ["download", "--no-deps", f"bigbench=={BIGBENCH_VERSION}", "-d", str(cache_dir)]
    result = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if result.returncode != 0 and "direct URL dependencies" in result.stderr:
        # Newer pip refuses the sdist's metadata (it names bleurt by URL) even with --no-deps;
        # pip 23.2.1, run straight from its wheel, still downloads it.
        result = _run_old_pip(args, cache_dir)
    if result.returncode != 0:
        message = (result.stderr or result.stdout).strip()
        raise FetchError(f"pip download of bigbench=={BIGBENCH_VERSION} failed:\n{message}\n"
                         f"(a copy already on disk, a task folder or the sdist, serves in its place: {LOCAL_ENV}=PATH)")
    if not tarball.is_file():
        present = sorted(p.name for p in cache_dir.iterdir())
        raise RuntimeError(
            f"pip download succeeded but {tarball} is missing; {cache_dir} has {present}"
        )
    return tarball
