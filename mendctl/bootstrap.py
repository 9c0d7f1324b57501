"""Paired bootstrap confidence interval for the difference in quality between two methods.

Both methods were scored on the same queries, so each resample draws one set of query indices per
(task, seed) and scores both methods on it: the interval reflects which queries happened to be in
the test set, not the (shared) noise of each method separately. The statistic is aggregated as the
results are: the metric per (task, seed), the mean over seeds, then over tasks.
"""
from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class Paired:
    """One (task, seed): the gold answers and what each method predicted, with the task's metric."""

    metric: Callable[[Sequence, Sequence], float]
    golds: list
    a: list
    b: list

    def difference(self, idx: Sequence[int] | None = None) -> float:
        pick = (lambda xs: xs) if idx is None else (lambda xs: [xs[i] for i in idx])
        golds = pick(self.golds)
        return self.metric(pick(self.a), golds) - self.metric(pick(self.b), golds)


def _aggregate(tasks: dict[str, list[Paired]], diff: Callable[[Paired], float]) -> float:
    return statistics.fmean(statistics.fmean(diff(p) for p in seeds) for seeds in tasks.values())


def paired_bootstrap(tasks: dict[str, list[Paired]], samples: int, seed: int, level: float = 0.95) -> dict:
    """Estimate of metric(a) - metric(b) and its percentile bootstrap interval, reproducible with `seed`."""
    rng = np.random.default_rng(seed)
    stats = [_aggregate(tasks, lambda p: p.difference(rng.integers(0, len(p.golds), len(p.golds))))
             for _ in range(samples)]
    low, high = np.percentile(stats, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return {"estimate": _aggregate(tasks, Paired.difference), "low": float(low), "high": float(high)}
