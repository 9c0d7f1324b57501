"""What `mendctl eval` found: each method on each (task, seed), and the means over seeds, then tasks.

`as_dict` gives the layout of results.json (docs/evaluation.md), which the report, the bench scripts
and the tests read: change a field name here and every reader breaks.
"""
from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields


def _present(obj) -> dict:
    # results.json has a key only where it has a value: a figure that does not apply is left out, not null.
    return {f.name: value for f in fields(obj) if (value := getattr(obj, f.name)) is not None}


@dataclass
class MethodResult:
    """One method on one demonstration set and its queries."""

    score: float
    n: int
    prefix_tokens: int
    flops_per_query: float
    latency_ms_per_query: float
    memory_bytes: int
    predictions: list[int]  # option index per query
    from_cache: bool
    timed_queries: int  # queries whose latency this run measured: a sample for a method scored from the cache
    distill_flops: float | None = None   # vectors rows: distilling and/or fitting the set, once
    compress_flops: float | None = None  # llmlingua: compressing the set, once

    def as_dict(self) -> dict:
        return _present(self)


@dataclass
class Agreement:
    """MEND against ICL on the same queries: how often they predict alike, and KL(icl || mend)."""

    agreement: float
    mean_kl: float


@dataclass
class SetResult:
    """One (task, seed): its demonstration set and the methods scored on its queries."""

    n_queries: int
    demos_hash: str
    available: int  # queries in the set's test file (more than n_queries under --limit)
    methods: dict[str, MethodResult] = field(default_factory=dict)
    vs_icl: dict[str, Agreement] = field(default_factory=dict)  # each vectors row against ICL

    def as_dict(self) -> dict:
        out = {"n_queries": self.n_queries, "available": self.available, "demos_hash": self.demos_hash,
               "methods": {m: r.as_dict() for m, r in self.methods.items()}}
        if self.vs_icl:
            out["vs_icl"] = {m: asdict(a) for m, a in self.vs_icl.items()}
        return out


@dataclass
class TaskResult:
    metric: str  # "macro-f1" (classification) or "accuracy"
    seeds: dict[str, SetResult] = field(default_factory=dict)

    def scores(self) -> dict[str, float]:
        methods = next(iter(self.seeds.values())).methods
        return {m: statistics.fmean(s.methods[m].score for s in self.seeds.values()) for m in methods}

    def as_dict(self) -> dict:
        return {"metric": self.metric, "seeds": {seed: s.as_dict() for seed, s in self.seeds.items()},
                "scores": self.scores()}


@dataclass
class MethodSummary:
    """One method over every task and seed."""

    score: float
    flops_per_query: float
    latency_ms_per_query: float
    memory_bytes: int  # the largest of any set
    from_cache: bool   # every set's scores were read from the cache
    timed_queries: int  # queries whose latency this run measured, over all sets (0: the cached latency)
    distill_flops_per_set: float | None = None
    compress_flops_per_set: float | None = None
    flops_ratio_to_icl: float | None = None  # when icl ran
    latency_ratio_to_icl: float | None = None

    def as_dict(self) -> dict:
        return _present(self)


def mean_over_seeds_then_tasks(tasks: dict[str, TaskResult], get: Callable[[SetResult], float]) -> float:
    return statistics.fmean(statistics.fmean(get(s) for s in task.seeds.values()) for task in tasks.values())


def summarize(tasks: dict[str, TaskResult], methods: list[str]) -> dict[str, MethodSummary]:
    every = [s for task in tasks.values() for s in task.seeds.values()]

    def mean(method: str, key: str) -> float:
        return mean_over_seeds_then_tasks(tasks, lambda s: getattr(s.methods[method], key))

    def once(method: str, key: str) -> float | None:
        return mean(method, key) if getattr(every[0].methods[method], key) is not None else None

    out = {m: MethodSummary(score=mean(m, "score"), flops_per_query=mean(m, "flops_per_query"),
                            latency_ms_per_query=mean(m, "latency_ms_per_query"),
                            memory_bytes=max(s.methods[m].memory_bytes for s in every),
                            from_cache=all(s.methods[m].from_cache for s in every),
                            timed_queries=sum(s.methods[m].timed_queries for s in every),
                            distill_flops_per_set=once(m, "distill_flops"),
                            compress_flops_per_set=once(m, "compress_flops"))
           for m in methods}
    if "icl" in out:
        for row in out.values():
            row.flops_ratio_to_icl = row.flops_per_query / out["icl"].flops_per_query
            row.latency_ratio_to_icl = row.latency_ms_per_query / out["icl"].latency_ms_per_query
    return out


def mean_agreement(tasks: dict[str, TaskResult], row: str) -> Agreement:
    return Agreement(**{k: mean_over_seeds_then_tasks(tasks, lambda s, k=k: getattr(s.vs_icl[row], k))
                        for k in ("agreement", "mean_kl")})
