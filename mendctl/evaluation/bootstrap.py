"""Paired bootstrap confidence interval for the difference in quality between two methods.

Both methods were scored on the same queries, so each resample draws one set of query indices per
(task, seed) and scores both methods on it: the interval reflects which queries happened to be in
the test set, not the (shared) noise of each method separately. The statistic is aggregated as the
results are: the metric per (task, seed), the mean over seeds, then over tasks. All resamples are
scored at once with numpy; `batch_metric` computes exactly metrics.macro_f1 / metrics.accuracy.
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


def _aggregate(tasks: dict[str, list[Paired]], diff) -> np.ndarray:
    return np.mean([np.mean([diff(p) for p in seeds], axis=0) for seeds in tasks.values()], axis=0)


def paired_bootstrap(tasks: dict[str, list[Paired]], samples: int, seed: int, level: float = 0.95) -> dict:
    """Estimate of metric(a) - metric(b) and its percentile bootstrap interval, reproducible with `seed`."""
    rng = np.random.default_rng(seed)
    stats = _aggregate(tasks, lambda p: p.difference(rng.integers(0, len(p.golds), (samples, len(p.golds)))))
    estimate = _aggregate(tasks, lambda p: p.difference(np.arange(len(p.golds))[None]))[0]
    low, high = np.percentile(stats, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return {"estimate": float(estimate), "low": float(low), "high": float(high)}
