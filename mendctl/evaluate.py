"""`mendctl eval`: zero-shot, ICL, truncated ICL and MEND on the test tasks, quality and cost.

Protocol (MetaICL): for every test task of the partition and every seed, the `_train` split of that
seed is the demonstration set and the `_test` split the queries. Each option is scored by the mean
per-token loss of its tokens after prefix + query input; the prediction is the lowest. The metric is
macro-F1 for classification tasks and accuracy otherwise, averaged over seeds, then over tasks.

What each method puts before the query (the prefix):
  zero-shot      nothing
  icl            the LLM's embeddings of the rendered demonstrations
  icl-truncated  the last K of those tokens: ICL with the token budget of K vectors
  mend           the K distilled vectors, read from output_dir/vectors when a file there was made for
                 this LLM and these demonstrations, else distilled now from the trained distiller
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import flops, metrics
from .backend import Models
from .config import Recipe, TemplateSpec, resolved_dict
from .data.metaicl import DataError, load_split
from .distill import UNTRAINED, DemoSet, demo_sets, distil, load_trained, set_anchors, vectors_path
from .fileio import atomic_path, write_json
from .partitions import Partition
from .provenance import stamp, text_hash
from .registry import get_backend
from .render import Query, context_ids, render_query
from .vectors import VectorsMismatch, check_compatible, load_vectors
from .workspace import data_dir, partition_for



@dataclass
class QuerySet:
    """One (task, seed): its demonstrations and its rendered queries."""

    demos: DemoSet
    queries: list[Query]
    options: list[list[str]]  # option texts, for the metric
    golds: list[str]
    where: list[str]          # file:line of each query, for error messages

    @property
    def key(self) -> str:
        return f"{self.demos.task}/{self.demos.seed}"


@dataclass
class MendVectors:
    vectors: torch.Tensor
    source: dict  # file or distilled now, and by which distiller: recorded in the results
    distill_flops: float


@dataclass
class MethodRun:
    predictions: list[int] = field(default_factory=list)
    losses: list[list[float]] = field(default_factory=list)
    flops: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    memory_bytes: int = 0


# --------------------------------------------------------------------------- inputs


def _query_set(recipe: Recipe, ds: DemoSet, template: TemplateSpec, tokenizer, limit: int | None) -> QuerySet:
    rows = load_split(data_dir(recipe), ds.task, recipe.tasks.k, ds.seed, "test")[:limit]
    for row in rows:
        if not row["options"]:
            raise DataError(f"{row['_where']}: no options to score (MetaICL scoring needs a list of options)")
    queries = [render_query(template, r["input"], r["options"], tokenizer) for r in rows]
    return QuerySet(ds, queries, [r["options"] for r in rows], [r["output"] for r in rows],
                    [r["_where"] for r in rows])


def _saved_vectors(recipe: Recipe, models: Models, ds: DemoSet) -> tuple[torch.Tensor | None, dict]:
    """The vectors file of a demonstration set if it was made for this LLM and these demonstrations."""
    path = vectors_path(recipe, ds.task, ds.seed)
    if not path.is_file():
        return None, {"source": "distilled", "reason": f"no file {path}"}
    try:
        vf = load_vectors(path)
        check_compatible(vf, models.llm_config_hash, models.llm.hidden_size, str(path))
    except VectorsMismatch as e:  # unreadable, or made for another LLM: distil this set now instead
        return None, {"source": "distilled", "reason": str(e)}
    if vf.metadata["demos_hash"] != text_hash(ds.context):
        return None, {"source": "distilled", "reason": f"{path} was made from other demonstrations"}
    return vf.vectors, {"source": "file", "path": str(path), "distiller_hash": vf.metadata["distiller_hash"]}


def _distill_input_len(models: Models, recipe: Recipe, context: str) -> int:
    # As distiller_inputs cuts them: the oldest tokens beyond max_length are dropped.
    ids = models.distiller_tokenizer(context, add_special_tokens=False).input_ids
    return min(len(ids), recipe.distiller.max_length)


def _mend_vectors(recipe: Recipe, models: Models, distiller_hash: str, sets: list[DemoSet],
                  console: Console) -> dict[str, MendVectors]:
    saved = {f"{ds.task}/{ds.seed}": _saved_vectors(recipe, models, ds) for ds in sets}
    todo = [ds for ds in sets if saved[f"{ds.task}/{ds.seed}"][0] is None]
    if todo and distiller_hash == UNTRAINED:
        first = saved[f"{todo[0].task}/{todo[0].seed}"][1]["reason"]
        raise FileNotFoundError(
            f"`mend` needs vectors for {len(todo)} demonstration set(s) ({first}) and there is no trained "
            f"distiller under {recipe.output_dir}: run `mendctl finetune` and `mendctl distill` first, "
            "set distill.checkpoint, or leave mend out of eval.methods")
    stale = {s["distiller_hash"] for v, s in saved.values() if v is not None} - {distiller_hash, UNTRAINED}
    if stale and distiller_hash != UNTRAINED:
        console.print(f"[yellow]warning[/]: some vectors files were made by another distiller than {distiller_hash}: "
                      "run `mendctl distill --force` to remake them")
    made = _distil_now(recipe, models, todo)
    out = {}
    for ds in sets:
        key = f"{ds.task}/{ds.seed}"
        vectors, source = saved[key]
        if vectors is None:
            vectors, source = made[key], source | {"distiller_hash": distiller_hash}
        cost = flops.distill_flops(models.distiller.body.config, _distill_input_len(models, recipe, ds.context),
                                   models.distiller.num_vectors, causal=models.distiller.causal,
                                   gated_mlp=models.gated_mlp)
        out[key] = MendVectors(vectors.to(models.llm.device, models.llm.dtype), source, cost)
    return out


def _distil_now(recipe: Recipe, models: Models, todo: list[DemoSet]) -> dict[str, torch.Tensor]:
    if not todo:
        return {}
    template = get_backend(recipe.backend).template(recipe)
    anchors = set_anchors(recipe, template, todo, models.llm_tokenizer)
    vectors = distil(models, [ds.context for ds in todo], recipe.distiller.max_length, recipe.eval.batch_size, anchors)
    return {f"{ds.task}/{ds.seed}": v for ds, v in zip(todo, vectors)}


def _prefix(method: str, qs: QuerySet, models: Models, template: TemplateSpec, k: int,
            mend: dict[str, MendVectors]) -> torch.Tensor:
    llm = models.llm
    if method == "mend":
        return mend[qs.key].vectors
    ids = context_ids(template, qs.demos.context, models.llm_tokenizer) if method != "zero-shot" else []
    if method == "icl-truncated":
        ids = ids[-k:]
    return llm.embed(torch.tensor(ids, dtype=torch.long, device=llm.device))


# --------------------------------------------------------------------------- scoring


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _losses(llm, prefix: torch.Tensor, query: Query) -> torch.Tensor:
    device = llm.device
    return llm.option_losses(prefix, torch.tensor(query.x, dtype=torch.long, device=device),
                             [torch.tensor(o, dtype=torch.long, device=device) for o in query.options])


def _score(llm, prefix: torch.Tensor, qs: QuerySet, advance, gated_mlp: bool) -> MethodRun:
    run, device, config = MethodRun(), llm.device, llm.model.config
    lengths = [(prefix.shape[0], len(q.x), [len(o) for o in q.options]) for q in qs.queries]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for query, where, (p, x, opts) in zip(qs.queries, qs.where, lengths):
        if p + x == 0:
            raise DataError(f"{where}: empty input and no prefix: nothing to score the options after")
        _sync(device)
        start = time.perf_counter()
        losses = _losses(llm, prefix, query)
        _sync(device)
        run.seconds.append(time.perf_counter() - start)
        run.losses.append(losses.tolist())
        run.predictions.append(int(losses.argmin()))
        run.flops.append(flops.llm_query_flops(config, p, x, opts, llm.is_encoder_decoder, gated_mlp))
        advance()
    if device.type == "cuda":
        run.memory_bytes = torch.cuda.max_memory_allocated(device)
    else:
        # No allocator counter on CPU: an analytic estimate for the longest query (flops.query_memory_bytes).
        run.memory_bytes = max(flops.query_memory_bytes(config, p, x, opts, llm.is_encoder_decoder, llm.dtype.itemsize,
                                                         gated_mlp)
                               for p, x, opts in lengths)
    return run


def _quality(run: MethodRun, qs: QuerySet, classification: bool) -> float:
    predicted = [opts[i] for opts, i in zip(qs.options, run.predictions)]
    return (metrics.macro_f1 if classification else metrics.accuracy)(predicted, qs.golds)


def _method_result(run: MethodRun, qs: QuerySet, prefix: torch.Tensor, classification: bool) -> dict:
    return {"score": _quality(run, qs, classification), "n": len(qs.queries), "prefix_tokens": prefix.shape[0],
            "flops_per_query": statistics.fmean(run.flops),
            "latency_ms_per_query": 1000 * statistics.fmean(run.seconds),
            "memory_bytes": run.memory_bytes, "predictions": run.predictions}


def _warm_up(llm, qs: QuerySet) -> None:
    # The first call pays one-off costs (kernel selection, allocator growth) that belong to no method.
    _losses(llm, llm.embed(torch.zeros(1, dtype=torch.long, device=llm.device)), qs.queries[0])


# --------------------------------------------------------------------------- aggregation


def _mean_over_seeds_then_tasks(tasks: dict, get) -> float:
    return statistics.fmean(statistics.fmean(get(s) for s in task["seeds"].values()) for task in tasks.values())


def _aggregate(tasks: dict, methods: list[str]) -> dict:
    def mean(method: str, key: str) -> float:
        return _mean_over_seeds_then_tasks(tasks, lambda s: s["methods"][method][key])

    out = {}
    for m in methods:
        out[m] = {"score": mean(m, "score"), "flops_per_query": mean(m, "flops_per_query"),
                  "latency_ms_per_query": mean(m, "latency_ms_per_query"),
                  "memory_bytes": max(s["methods"][m]["memory_bytes"] for t in tasks.values()
                                      for s in t["seeds"].values())}
        if m == "mend":
            out[m]["distill_flops_per_set"] = mean(m, "distill_flops")
    if "icl" in out:
        for row in out.values():
            row["flops_ratio_to_icl"] = row["flops_per_query"] / out["icl"]["flops_per_query"]
            row["latency_ratio_to_icl"] = row["latency_ms_per_query"] / out["icl"]["latency_ms_per_query"]
    return out


def _task_summaries(tasks: dict, methods: list[str]) -> None:
    for task in tasks.values():
        task["scores"] = {m: statistics.fmean(s["methods"][m]["score"] for s in task["seeds"].values())
                          for m in methods}


def _compare(icl: MethodRun, mend: MethodRun) -> dict:
    return {"agreement": metrics.agreement(icl.predictions, mend.predictions),
            "mean_kl": metrics.mean_kl(icl.losses, mend.losses)}


# --------------------------------------------------------------------------- reporting


def _si(x: float | None) -> str:
    if x is None:
        return "-"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.3g}"


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _memory(n: int, estimated: bool) -> str:
    unit, scale = next(((u, s) for u, s in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)) if n >= s), ("B", 1))
    return f"{n / scale:.1f} {unit}" + (" (est.)" if estimated else "")


HEADER = ("method", "quality (%)", "FLOPs/query", "ratio to icl", "latency ms/query", "ratio", "memory",
          "distil FLOPs/task")


def _rows(results: dict) -> list[tuple[str, ...]]:
    estimated = results["memory_kind"] == "estimated"
    rows = []
    for m, a in results["aggregate"].items():
        rows.append((m, f"{100 * a['score']:.1f}", _si(a["flops_per_query"]), _ratio(a.get("flops_ratio_to_icl")),
                     f"{a['latency_ms_per_query']:.2f}", _ratio(a.get("latency_ratio_to_icl")),
                     _memory(a["memory_bytes"], estimated), _si(a.get("distill_flops_per_set"))))
    return rows


def _table(results: dict) -> Table:
    table = Table(*HEADER, title=f"eval: {results['partition']} ({results['device']})")
    for row in _rows(results):
        table.add_row(*row)
    return table


def _markdown(results: dict) -> str:
    lines = [f"# mendctl eval: {results['partition']}", "",
             f"device: {results['device']}; limit: {results['limit'] or 'none'} queries per task and seed; "
             f"seeds: {results['seeds']}; K = {results['num_vectors']}", "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(results)]
    if "mend_vs_icl" in results:
        c = results["mend_vs_icl"]
        lines += ["", f"MEND vs ICL: agreement {100 * c['agreement']:.1f}%, mean KL(icl || mend) {c['mean_kl']:.4f}"]
    methods = list(results["aggregate"])
    lines += ["", "## Per task (mean over seeds, %)", "", "| task | metric | " + " | ".join(methods) + " |",
              "|" + "---|" * (len(methods) + 2)]
    for name, task in results["tasks"].items():
        scores = " | ".join(f"{100 * task['scores'][m]:.1f}" for m in methods)
        lines.append(f"| {name} | {task['metric']} | {scores} |")
    if results["memory_kind"] == "estimated":
        lines += ["", "memory (est.): analytic estimate of the KV cache and activations of the longest query, "
                      "weights excluded (no allocator counter on CPU); see docs/evaluation.md"]
    return "\n".join(lines) + "\n"


def _plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(5, 4))
    for m, a in results["aggregate"].items():
        ax.scatter(a["flops_per_query"], 100 * a["score"], s=40)
        ax.annotate(m, (a["flops_per_query"], 100 * a["score"]), textcoords="offset points", xytext=(5, 5))
    ax.set_xscale("log")
    ax.set_xlabel("LLM forward FLOPs per query")
    ax.set_ylabel("quality (%, macro-F1 / accuracy)")
    ax.set_title(f"{results['partition']}: quality vs cost")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return True


def _vectors_note(results: dict, recipe: Recipe) -> str:
    sources = [s["source"] for s in results["vectors"]["sources"].values()]
    note = f"mend vectors: {sources.count('file')} file(s) from {recipe.output_dir / 'vectors'}"
    if "distilled" in sources:
        note += f", {sources.count('distilled')} set(s) distilled on the fly (run `mendctl distill` to save them)"
    return note


# --------------------------------------------------------------------------- the command


def _device_name(device: torch.device) -> str:
    return f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "cpu"


def _load(recipe: Recipe) -> tuple[Models, str, torch.device]:
    models, distiller_hash = load_trained(recipe, require=False)
    return models, distiller_hash, models.llm.device


def _evaluate_set(qs: QuerySet, methods: list[str], models: Models, template: TemplateSpec, recipe: Recipe,
                  partition: Partition, mend: dict[str, MendVectors], progress: Progress, bar) -> dict:
    classification = partition.is_classification(qs.demos.task)
    result, runs = {"n_queries": len(qs.queries), "demos_hash": text_hash(qs.demos.context), "methods": {}}, {}
    for method in methods:
        progress.update(bar, description=f"{qs.demos.task} seed {qs.demos.seed} {method}")
        prefix = _prefix(method, qs, models, template, recipe.num_vectors, mend)
        runs[method] = _score(models.llm, prefix, qs, lambda: progress.advance(bar), models.gated_mlp)
        result["methods"][method] = _method_result(runs[method], qs, prefix, classification)
        if not progress.console.is_terminal:  # the bar is invisible in a log file: one line per method
            progress.console.print(f"eval {qs.demos.task} seed {qs.demos.seed} {method}: "
                                   f"{100 * result['methods'][method]['score']:.1f}")
    if "mend" in methods:
        result["methods"]["mend"]["distill_flops"] = mend[qs.key].distill_flops
    if {"icl", "mend"} <= set(methods):
        result["mend_vs_icl"] = _compare(runs["icl"], runs["mend"])
    return result


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("queries"),
                    TimeElapsedColumn(), console=console)


@torch.no_grad()
def run_eval(recipe: Recipe, limit: int | None = None, console: Console | None = None) -> dict:
    """Evaluates recipe.eval.methods on the test tasks; writes output_dir/eval/results.{json,md}; returns them."""
    console = console or Console()
    methods = list(recipe.eval.methods)
    models, distiller_hash, device = _load(recipe)
    template = get_backend(recipe.backend).template(recipe)
    partition = partition_for(recipe)
    sets = [_query_set(recipe, ds, template, models.llm_tokenizer, limit)
            for ds in demo_sets(recipe, template, models.llm_tokenizer)]
    mend = {}
    if "mend" in methods:
        mend = _mend_vectors(recipe, models, distiller_hash, [qs.demos for qs in sets], console)
    _warm_up(models.llm, sets[0])
    tasks: dict[str, dict] = {}
    with _progress(console) as progress:
        bar = progress.add_task("eval", total=sum(len(qs.queries) for qs in sets) * len(methods))
        for qs in sets:
            task = tasks.setdefault(qs.demos.task, {
                "metric": "macro-f1" if partition.is_classification(qs.demos.task) else "accuracy", "seeds": {}})
            task["seeds"][str(qs.demos.seed)] = _evaluate_set(qs, methods, models, template, recipe, partition, mend,
                                                              progress, bar)
    results = _results(recipe, limit, methods, tasks, partition, device, models, mend)
    _write(results, recipe, console)
    return results


def _results(recipe: Recipe, limit: int | None, methods: list[str], tasks: dict, partition: Partition,
             device: torch.device, models: Models, mend: dict[str, MendVectors]) -> dict:
    _task_summaries(tasks, methods)
    results = {
        "partition": partition.name, "device": _device_name(device), "limit": limit, "seeds": recipe.tasks.seeds,
        "methods": methods, "num_vectors": recipe.num_vectors,
        "memory_kind": "cuda_peak_allocated" if device.type == "cuda" else "estimated",
        "llm_weights_bytes": sum(p.numel() * p.element_size() for p in models.llm.parameters()),
        "aggregate": _aggregate(tasks, methods), "tasks": tasks,
    }
    if {"icl", "mend"} <= set(methods):
        results["mend_vs_icl"] = {
            k: _mean_over_seeds_then_tasks(tasks, lambda s, k=k: s["mend_vs_icl"][k]) for k in ("agreement", "mean_kl")}
    if mend:
        results["vectors"] = {"dir": str(recipe.output_dir / "vectors"),
                              "sources": {key: v.source for key, v in mend.items()}}
    results["recipe"] = resolved_dict(recipe)
    results["provenance"] = stamp()
    return results


def _write(results: dict, recipe: Recipe, console: Console) -> None:
    out = recipe.output_dir / "eval"
    write_json(out / "results.json", results)
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text(_markdown(results))
    console.print(_table(results))
    if "mend_vs_icl" in results:
        c = results["mend_vs_icl"]
        console.print(f"MEND vs ICL: agreement {100 * c['agreement']:.1f}%, mean KL(icl || mend) {c['mean_kl']:.4f}")
    if "vectors" in results:
        console.print(_vectors_note(results, recipe))
    plotted = _plot(results, out / "quality_vs_cost.png")
    console.print(f"results in {out / 'results.json'} and {out / 'results.md'}"
                  + (f", plot {out / 'quality_vs_cost.png'}" if plotted else ""))
