"""The bootstrap over tasks, then queries (mendctl/bootstrap.py): its properties on hand-made predictions."""
import random
import statistics

import numpy as np
import pytest

from mendctl.evaluation.bootstrap import MIN_QUERIES, MIN_TASKS, Paired, task_bootstrap, too_few
from mendctl.evaluation.metrics import accuracy, macro_f1


def _noisy(rng: random.Random, n: int = 40, good: float = 0.8, poor: float = 0.5) -> Paired:
    golds = [rng.choice("xyz") for _ in range(n)]
    return Paired(True, golds, [g if rng.random() < good else rng.choice("xyz") for g in golds],
                  [g if rng.random() < poor else rng.choice("xyz") for g in golds])


def _width(ci: dict) -> float:
    return ci["high"] - ci["low"]


def test_brackets_the_estimate_of_the_mean_over_seeds_then_tasks_and_is_reproducible():
    rng = random.Random(0)
    tasks = [[_noisy(rng), _noisy(rng)] for _ in range(4)]
    ci = task_bootstrap(tasks, 300, seed=1)
    estimate = statistics.fmean(statistics.fmean(macro_f1(p.a, p.golds) - macro_f1(p.b, p.golds) for p in seeds)
                                for seeds in tasks)
    assert ci["estimate"] == pytest.approx(estimate)
    assert ci["low"] < ci["estimate"] < ci["high"] and ci["low"] > 0  # 0.8 vs 0.5 right: clearly better
    assert task_bootstrap(tasks, 300, seed=1) == ci
    assert task_bootstrap(tasks, 300, seed=2) != ci
    same = [[Paired(True, p.golds, p.a, p.a) for p in seeds] for seeds in tasks]
    assert task_bootstrap(same, 50, seed=1) == {"estimate": 0.0, "low": 0.0, "high": 0.0}


def test_with_one_task_the_width_is_the_query_bootstrap_alone():
    p = _noisy(random.Random(3))
    ci = task_bootstrap([[p]], 500, seed=7)
    # By hand: one draw of query indices, nothing else (drawing the one task again changes nothing).
    idx = np.random.default_rng(7).integers(0, len(p.golds), (500, len(p.golds)))
    low, high = np.percentile(p.difference(idx), [2.5, 97.5])
    assert (ci["low"], ci["high"]) == (pytest.approx(low), pytest.approx(high)) and _width(ci) > 0


def test_seeds_with_identical_scores_add_no_width():
    rng = random.Random(5)
    tasks = [[_noisy(rng)] for _ in range(3)]
    # Each task's one set three times over: the seeds share the query draw, so their mean is the one set's.
    tripled = [seeds * 3 for seeds in tasks]
    assert task_bootstrap(tripled, 400, seed=2) == pytest.approx(task_bootstrap(tasks, 400, seed=2))


def test_a_constant_shift_gives_a_zero_width_interval_at_the_shift():
    golds = list("xyzxyzxyzxyzxyzxyzxyzxyz")
    wrong = ["y" if g == "x" else "x" for g in golds]
    tasks = [[Paired(False, golds, golds, wrong)] * 2 for _ in range(3)]  # right against wrong on every query
    assert task_bootstrap(tasks, 200, seed=0) == {"estimate": 1.0, "low": 1.0, "high": 1.0}


def test_tasks_that_differ_widen_the_interval_where_queries_alone_would_not():
    golds = list("xyzxyzxyzxyzxyzxyzxyzxyz")
    wrong = ["y" if g == "x" else "x" for g in golds]
    # One task where a beats b on every query, one where they tie on every query: no query noise at all.
    tasks = [[Paired(False, golds, golds, wrong)], [Paired(False, golds, golds, golds)]]
    ci = task_bootstrap(tasks, 500, seed=0)
    assert ci["estimate"] == pytest.approx(0.5)
    assert ci["low"] == 0.0 and ci["high"] == 1.0  # some resamples draw one task twice
    assert accuracy(golds, golds) - accuracy(wrong, golds) == 1.0


def test_too_few_tasks_or_queries_are_named():
    assert too_few(MIN_TASKS, MIN_QUERIES) is None
    assert "too few tasks" in too_few(MIN_TASKS - 1, 200)
    assert "too few queries" in too_few(7, MIN_QUERIES - 1)
