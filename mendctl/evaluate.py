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
  llmlingua      the K most informative of those tokens under the LLM (compress.py), once per set

The first three do not depend on the distiller: their scores are cached (eval_cache.py), so a new
distiller costs only its own scoring. MEND minus ICL and minus zero-shot come with paired bootstrap
intervals (bootstrap.py). The scoring itself is shared with the trainer's curves (scoring.py).
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import eval_cache, flops, metrics
from .compress import NOTE, SEGMENT_TOKENS, Compressed, compress
from .backend import Models
from .bootstrap import Paired, paired_bootstrap
from .config import Recipe, TemplateSpec, resolved_dict
from .anchors import set_anchors
from .distiller import distil
from .fileio import atomic_path, write_json
from .partitions import Partition
from .provenance import stamp, text_hash
from .registry import get_backend
from .render import context_ids
from .scoring import DemoSet, MethodRun, QuerySet, demo_sets, option_losses, predicted, query_set, quality, score
from .trained import UNTRAINED, load_trained
from .vectors import VectorsMismatch, check_compatible, load_vectors
from .workspace import data_dir, partition_for, vectors_path



@dataclass
class MendVectors:
    vectors: torch.Tensor
    source: dict  # file or distilled now, and by which distiller: recorded in the results
    distill_flops: float


# --------------------------------------------------------------------------- inputs


def _query_set(recipe: Recipe, ds: DemoSet, template: TemplateSpec, tokenizer, limit: int | None) -> QuerySet:
    return query_set(data_dir(recipe), ds, recipe.tasks.k, template, tokenizer, limit)


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
    return min(len(ids), recipe.distiller.max_length, models.distiller.max_input or len(ids))


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


def _compressed(qs: QuerySet, models: Models, template: TemplateSpec, k: int) -> dict[str, Compressed]:
    return {qs.key: compress(models.llm, context_ids(template, qs.demos.context, models.llm_tokenizer), k,
                             models.gated_mlp)}


def _prefix(method: str, qs: QuerySet, models: Models, template: TemplateSpec, k: int,
            mend: dict[str, MendVectors], lingua: dict[str, Compressed] | None = None) -> torch.Tensor:
    llm = models.llm
    if method == "mend":
        return mend[qs.key].vectors
    ids = context_ids(template, qs.demos.context, models.llm_tokenizer) if method != "zero-shot" else []
    if method == "icl-truncated":
        ids = ids[-k:]
    elif method == "llmlingua":
        ids = lingua[qs.key].ids
    return llm.embed(torch.tensor(ids, dtype=torch.long, device=llm.device))


# --------------------------------------------------------------------------- scoring


def _method_result(run: MethodRun, qs: QuerySet, prefix_tokens: int, classification: bool, cached: bool) -> dict:
    return {"score": quality(run.predictions, qs, classification), "n": len(qs.queries),
            "prefix_tokens": prefix_tokens, "flops_per_query": statistics.fmean(run.flops),
            "latency_ms_per_query": 1000 * statistics.fmean(run.seconds),
            "memory_bytes": run.memory_bytes, "predictions": run.predictions, "from_cache": cached}


def _warm_up(llm, qs: QuerySet) -> None:
    # The first call pays one-off costs (kernel selection, allocator growth) that belong to no method.
    option_losses(llm, llm.embed(torch.zeros(1, dtype=torch.long, device=llm.device)), qs.queries[0])


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
                                      for s in t["seeds"].values()),
                  # Cached latencies were measured when the entry was made, possibly in another run.
                  "from_cache": all(s["methods"][m]["from_cache"] for t in tasks.values() for s in t["seeds"].values())}
        if m == "mend":
            out[m]["distill_flops_per_set"] = mean(m, "distill_flops")
        if m == "llmlingua":
            out[m]["compress_flops_per_set"] = mean(m, "compress_flops")
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
                     f"{a['latency_ms_per_query']:.2f}" + (" (cached)" if a["from_cache"] else ""),
                     _ratio(a.get("latency_ratio_to_icl")), _memory(a["memory_bytes"], estimated),
                     _si(a.get("distill_flops_per_set", a.get("compress_flops_per_set")))))
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
    if "llmlingua" in results:
        lines += ["", f"llmlingua: {results['llmlingua']['implementation']}; its distil FLOPs column is the "
                      "compression's scoring cost"]
    lines += [""] + _bootstrap_lines(results) if "bootstrap" in results else []
    if any(a["from_cache"] for a in results["aggregate"].values()):
        lines += ["", "(cached): scores and latency read from the baseline cache; the latency is the one measured "
                      "when the entry was computed"]
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


def _bootstrap_lines(results: dict) -> list[str]:
    b = results["bootstrap"]
    return [f"MEND - {key.removeprefix('mend_minus_')}: {100 * c['estimate']:+.1f} points, "
            f"{100 * b['level']:.0f}% CI [{100 * c['low']:+.1f}, {100 * c['high']:+.1f}] "
            f"(paired bootstrap over queries, {b['samples']} resamples, seed {b['seed']})"
            for key, c in b.items() if key.startswith("mend_minus_")]


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def _run_method(method: str, qs: QuerySet, models: Models, template: TemplateSpec, recipe: Recipe, limit: int | None,
                mend: dict[str, MendVectors], advance) -> tuple[MethodRun, int, bool]:
    """The method's scores on `qs`, from the cache when they do not depend on the distiller and are there."""
    description = None
    if recipe.eval.cache and method in eval_cache.CACHED_METHODS:
        description = eval_cache.describe(models, template, data_dir(recipe), recipe.tasks.k, qs, method,
                                          recipe.num_vectors, limit, _device_name(models.llm.device))
        if (hit := eval_cache.load(description)) is not None:
            advance(len(qs.queries))
            return *hit, True
    # Compressed once per set, and only when not cached: the compression is llmlingua's dearest part.
    lingua = _compressed(qs, models, template, recipe.num_vectors) if method == "llmlingua" else None
    prefix = _prefix(method, qs, models, template, recipe.num_vectors, mend, lingua)
    run = score(models.llm, prefix, qs, models.gated_mlp, lambda: advance(1))
    if lingua:
        run.prefix_flops = lingua[qs.key].flops
    if description is not None:
        eval_cache.save(description, run, prefix.shape[0])
    return run, prefix.shape[0], False


def _evaluate_set(qs: QuerySet, methods: list[str], models: Models, template: TemplateSpec, recipe: Recipe,
                  limit: int | None, partition: Partition, mend: dict[str, MendVectors],
                  progress: Progress, bar) -> dict:
    classification = partition.is_classification(qs.demos.task)
    result, runs = {"n_queries": len(qs.queries), "demos_hash": text_hash(qs.demos.context), "methods": {}}, {}
    for method in methods:
        progress.update(bar, description=f"{qs.demos.task} seed {qs.demos.seed} {method}")
        runs[method], prefix_tokens, cached = _run_method(method, qs, models, template, recipe, limit, mend,
                                                          lambda n: progress.advance(bar, n))
        result["methods"][method] = _method_result(runs[method], qs, prefix_tokens, classification, cached)
        if not progress.console.is_terminal:  # the bar is invisible in a log file: one line per method
            progress.console.print(f"eval {qs.demos.task} seed {qs.demos.seed} {method}: "
                                   f"{100 * result['methods'][method]['score']:.1f}")
    if "mend" in methods:
        result["methods"]["mend"]["distill_flops"] = mend[qs.key].distill_flops
    if "llmlingua" in methods:
        result["methods"]["llmlingua"]["compress_flops"] = runs["llmlingua"].prefix_flops
    if {"icl", "mend"} <= set(methods):
        result["mend_vs_icl"] = _compare(runs["icl"], runs["mend"])
    return result


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("queries"),
                    TimeElapsedColumn(), console=console)


def _bootstrap(recipe: Recipe, sets: list[QuerySet], tasks: dict, methods: list[str], partition: Partition) -> dict:
    out = {"samples": recipe.eval.bootstrap_samples, "seed": recipe.eval.bootstrap_seed, "level": 0.95}
    for baseline in ("icl", "zero-shot"):
        if baseline not in methods:
            continue
        paired: dict[str, list[Paired]] = {}
        for qs in sets:
            run = tasks[qs.demos.task]["seeds"][str(qs.demos.seed)]["methods"]
            paired.setdefault(qs.demos.task, []).append(Paired(
                partition.is_classification(qs.demos.task), qs.golds, predicted(run["mend"]["predictions"], qs), predicted(run[baseline]["predictions"], qs)))
        out[f"mend_minus_{baseline}"] = paired_bootstrap(paired, recipe.eval.bootstrap_samples,
                                                         recipe.eval.bootstrap_seed)
    return out


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
            task["seeds"][str(qs.demos.seed)] = _evaluate_set(qs, methods, models, template, recipe, limit, partition,
                                                              mend, progress, bar)
    results = _results(recipe, limit, methods, tasks, partition, device, models, mend)
    if recipe.eval.bootstrap_samples and "mend" in methods:
        results["bootstrap"] = _bootstrap(recipe, sets, tasks, methods, partition)
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
    if "llmlingua" in methods:
        results["llmlingua"] = {"implementation": NOTE, "segment_tokens": SEGMENT_TOKENS}
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
    for line in _bootstrap_lines(results) if "bootstrap" in results else []:
        console.print(line)
    if "vectors" in results:
        console.print(_vectors_note(results, recipe))
    _plot(results, out / "quality_vs_cost.png")
    console.print(f"results in {out / 'results.json'} and {out / 'results.md'}, plot {out / 'quality_vs_cost.png'}")
