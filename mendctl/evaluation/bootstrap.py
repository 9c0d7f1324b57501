"""Bootstrap confidence interval for the difference in quality between two methods, over tasks.

The statistic is aggregated as the results are: the metric per (task, seed), the mean over seeds,
then over tasks. Each resample draws the tasks with replacement, then, within each task, one set
of query indices, which every seed of the task and both methods are scored on: the seeds of a task
share their test queries (the MetaICL layout), and both methods answered the same ones. The interval
so reflects which tasks and which of their queries happened to be tested; the seeds (which
demonstrations were drawn) enter through the mean over them, not as a resampled level. A task drawn
twice in one resample reuses its one draw of queries. All resamples are scored at once with numpy;
`batch_metric` computes exactly metrics.macro_f1 / metrics.accuracy.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def batch_metric(pred: np.ndarray, gold: np.ndarray, classification: bool) -> np.ndarray:
    """[B, n] label ids -> [B] scores: MetaICL's macro-F1 (metrics.macro_f1) or accuracy, row by row."""
    if not classification:
        return (pred == gold).mean(axis=1)
    f1s, present = [], []
    for c in np.unique(gold):
        is_gold, is_pred = gold == c, pred == c
        hits, n_gold, n_pred = (is_gold & is_pred).sum(1), is_gold.sum(1), is_pred.sum(1)
        recall = hits / np.maximum(n_gold, 1)
        precision = np.where(n_pred > 0, hits / np.maximum(n_pred, 1), 1.0)  # MetaICL: 1.0 when never predicted
        total = precision + recall
        f1s.append(np.where(total > 0, 2 * precision * recall / np.where(total > 0, total, 1), 0.0))
        present.append(n_gold > 0)  # averaged over the classes among this row's golds only
    f1s, present = np.stack(f1s), np.stack(present)
    return (f1s * present).sum(0) / present.sum(0)


@dataclass
class Paired:
    """One (task, seed): the gold answers and what each method predicted."""

    classification: bool
    golds: list
    a: list
    b: list

    def difference(self, idx: np.ndarray) -> np.ndarray:
        """metric(a) - metric(b) on each row of query indices `idx` [B, n]."""
        ids = {label: i for i, label in enumerate(sorted(set(self.golds) | set(self.a) | set(self.b)))}
        as_ids = lambda xs: np.array([ids[x] for x in xs])[idx]  # noqa: E731
        gold = as_ids(self.golds)
        return (batch_metric(as_ids(self.a), gold, self.classification)
                - batch_metric(as_ids(self.b), gold, self.classification))


RESAMPLED = ("tasks with replacement, then each task's queries with replacement, the same indices for every "
             "seed of the task and both methods")
MIN_TASKS, MIN_QUERIES = 2, 20  # below either an interval says little: it is reported as too few, not printed


def too_few(tasks: int, queries: int) -> str | None:
    """Why `tasks` tasks with at least `queries` queries each are too few for an interval, or None."""
    if tasks < MIN_TASKS:
        return f"too few tasks: {tasks} < {MIN_TASKS}"
    if queries < MIN_QUERIES:
        return f"too few queries: {queries} < {MIN_QUERIES} per set"
    return None


def task_bootstrap(tasks: list[list[Paired]], samples: int, seed: int, level: float = 0.95) -> dict:
    """Estimate of metric(a) - metric(b) and its percentile interval over resampled tasks and queries
    (module docstring), reproducible with `seed`; `tasks` holds each task's seeds."""
    rng = np.random.default_rng(seed)
    per_task = []
    for seeds in tasks:
        draws: dict[int, np.ndarray] = {}  # seeds with as many queries share one draw (they share the queries)
        for n in sorted({len(p.golds) for p in seeds}):
            draws[n] = rng.integers(0, n, (samples, n))
        per_task.append(np.mean([p.difference(draws[len(p.golds)]) for p in seeds], axis=0))
    picks = rng.integers(0, len(tasks), (samples, len(tasks)))
    stats = np.stack(per_task)[picks, np.arange(samples)[:, None]].mean(axis=1)
    estimate = np.mean([np.mean([p.difference(np.arange(len(p.golds))[None])[0] for p in seeds]) for seeds in tasks])
    low, high = np.percentile(stats, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return {"estimate": float(estimate), "low": float(low), "high": float(high)}
