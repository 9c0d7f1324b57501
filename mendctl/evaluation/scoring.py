"""Scoring options after a prefix: the MetaICL protocol shared by `mendctl eval` and the trainer's
validation curves.

A demonstration set is a task's `_train` split of one seed, rendered once; its query set is the
`_test` split of that seed. Each option is scored by the mean per-token loss of its tokens after
prefix + query input; the prediction is the lowest.

A decoder-only LLM runs the prefix once per query set and the queries on top of its cache, `PACK`
at a time (`FrozenLM.prefix_cache`, `cached_option_losses`). What a query costs a user is still
counted as if it read the prefix itself: its FLOPs count the prefix in full. Its latency is what
the set took per query: its pack's time shared evenly, plus an even share of the prefix's.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.config import TemplateSpec
from ..data.metaicl import DataError, load_split
from ..models.render import Query, render_context, render_query
from . import flops, metrics

# Queries scored together on a prefix cache: each pass on the cache copies and attends to the whole
# prefix, so packing shares that too. On a 2-core CPU (SmolLM2-135M, a 360-token ICL prefix, 20
# queries) 8 at a time scored the set 1.8x faster than one at a time, 20 no faster
# (bench/prefix_reuse.py); a pack's memory grows with it.
PACK = 8


@dataclass
class DemoSet:
    task: str
    seed: int
    demos: list[dict]
    context: str  # the demonstrations rendered with the template, as the distiller reads them


@dataclass
class QuerySet:
    """One (task, seed): its demonstrations and its rendered queries."""

    demos: DemoSet
    queries: list[Query]      # rendered to follow demonstrations or vectors: the separator opens each
    alone: list[Query]        # the same with nothing before them (zero-shot): no separator
    options: list[list[str]]  # option texts, for the metric
    golds: list[str]
    where: list[str]          # file:line of each query, for error messages
    available: int | None = None  # queries in the test file, of which `limit` kept the first

    @property
    def key(self) -> str:
        return f"{self.demos.task}/{self.demos.seed}"

    def rendered(self, prefix: torch.Tensor) -> list[Query]:
        """The queries as they follow this prefix: the separator opens them when anything precedes."""
        return self.queries if prefix.shape[0] else self.alone


@dataclass
class MethodRun:
    predictions: list[int] = field(default_factory=list)
    losses: list[list[float]] = field(default_factory=list)
    flops: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    memory_bytes: int = 0
    prefix_flops: float = 0.0  # one-off cost of making the prefix for the whole set (llmlingua's compression)
    prefix_seconds: float = 0.0  # one-off time of running the prefix for the whole set, already shared out in `seconds`


def demo_set(root: Path, task: str, k: int, seed: int, template: TemplateSpec, tokenizer) -> DemoSet:
    demos = load_split(root, task, k, seed, "train")
    return DemoSet(task, seed, demos, render_context(template, demos, tokenizer))


def query_set(root: Path, ds: DemoSet, k: int, template: TemplateSpec, tokenizer, limit: int | None) -> QuerySet:
    every = load_split(root, ds.task, k, ds.seed, "test")
    rows = every[:limit]
    for row in rows:
        if not row["options"]:
            raise DataError(f"{row['_where']}: no options to score (MetaICL scoring needs a list of options)")
    queries, alone = ([render_query(template, r["input"], r["options"], tokenizer, after_context=after) for r in rows]
                      for after in (True, False))
    return QuerySet(ds, queries, alone, [r["options"] for r in rows], [r["output"] for r in rows],
                    [r["_where"] for r in rows], len(every))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ids(llm, query: Query) -> tuple[torch.Tensor, list[torch.Tensor]]:
    device = llm.device
    return (torch.tensor(query.x, dtype=torch.long, device=device),
            [torch.tensor(o, dtype=torch.long, device=device) for o in query.options])


def option_losses(llm, prefix: torch.Tensor, query: Query) -> torch.Tensor:
    return llm.option_losses(prefix, *_ids(llm, query))


def _packs(llm, cached, queries: list[tuple[torch.Tensor, list[torch.Tensor]]], pack: int,
           ) -> list[tuple[list[int], bool]]:
    """Query indices in scoring order, each group with whether it runs on the cache: up to `pack`
    queries that fit it together, any other alone and in full (a left cut, no cache)."""
    out, open_ = [], []
    for i, (x, options) in enumerate(queries):
        if cached is None or not llm.fits(cached, x, options):
            out.append(([i], False))
            continue
        open_.append(i)
        if len(open_) == pack:
            out.append((open_, True))
            open_ = []
    return out + [(open_, True)] if open_ else out


def score(llm, prefix: torch.Tensor, qs: QuerySet, gated_mlp: bool, advance=lambda: None,
          reuse_prefix: bool = True, pack: int = PACK) -> MethodRun:
    """Every query of `qs` after `prefix`: losses, predictions, and what each cost.

    `reuse_prefix=False` runs the prefix again for every query, as scoring did before the cache (for
    benchmarks and tests); `pack` queries run together on the cache.
    """
    run, device, config = MethodRun(), llm.device, llm.model.config
    queries = qs.rendered(prefix)
    # The cost counts every position the LLM reads before the query, BOS included.
    lengths = [(prefix.shape[0] + llm.bos_len, len(q.x), [len(o) for o in q.options]) for q in queries]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for where, (p, x, opts) in zip(qs.where, lengths):
        if p + x == 0:
            raise DataError(f"{where}: empty input and no prefix: nothing to score the options after")
    ids = [_ids(llm, q) for q in queries]
    cached = None
    if reuse_prefix and queries:
        _sync(device)
        start = time.perf_counter()
        cached = llm.prefix_cache(prefix)
        _sync(device)
        run.prefix_seconds = time.perf_counter() - start
    # Latency per query is what the set took per query: a user scoring one query alone would pay
    # the whole prefix, one scoring the set pays it once.
    share = run.prefix_seconds / max(len(queries), 1)
    losses, seconds = [None] * len(queries), [0.0] * len(queries)
    for group, on_cache in _packs(llm, cached, ids, pack):
        _sync(device)
        start = time.perf_counter()
        if on_cache:
            out = llm.cached_option_losses(cached, [ids[i] for i in group])
        else:
            out = [llm.option_losses(prefix, *ids[group[0]])]
        _sync(device)
        took = (time.perf_counter() - start) / len(group)
        for i, o in zip(group, out):
            losses[i], seconds[i] = o, took + share
            advance()
    for (p, x, opts), loss, took in zip(lengths, losses, seconds):
        run.seconds.append(took)
        run.losses.append(loss.tolist())
        run.predictions.append(int(loss.argmin()))
        run.flops.append(flops.llm_query_flops(config, p, x, opts, llm.is_encoder_decoder, gated_mlp))
    if device.type == "cuda":
        run.memory_bytes = torch.cuda.max_memory_allocated(device)
    else:
        # No allocator counter on CPU: an analytic estimate for the longest query (flops.query_memory_bytes).
        run.memory_bytes = max(flops.query_memory_bytes(config, p, x, opts, llm.is_encoder_decoder, llm.dtype.itemsize,
                                                         gated_mlp)
                               for p, x, opts in lengths)
    return run


def predicted(predictions: list[int], qs: QuerySet) -> list[str]:
    return [opts[i] for opts, i in zip(qs.options, predictions)]


def quality(predictions: list[int], qs: QuerySet, classification: bool) -> float:
    """Macro-F1 for a classification task, accuracy otherwise."""
    return (metrics.macro_f1 if classification else metrics.accuracy)(predicted(predictions, qs), qs.golds)


def demo_sets(recipe, template: TemplateSpec, tokenizer) -> list[DemoSet]:
    """One demonstration set per (test task, seed): the `_train` split of that seed."""
    from ..data.workspace import data_dir, partition_for

    root, tasks = data_dir(recipe), recipe.tasks
    return [demo_set(root, task, tasks.k, seed, template, tokenizer)
            for task in partition_for(recipe).test for seed in tasks.seeds]
