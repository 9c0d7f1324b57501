"""`mendctl eval`: zero-shot, ICL, truncated ICL and MEND on the test tasks, quality and cost.

Protocol (MetaICL): for every test task of the partition and every seed, the `_train` split of that
seed is the demonstration set and the `_test` split the queries. Each option is scored by the mean
per-token loss of its tokens after prefix + query input; the prediction is the lowest. The metric is
macro-F1 for classification tasks and accuracy otherwise, averaged over seeds, then over tasks.

What each method puts before the query (the prefix):
  zero-shot      nothing
  icl            the LLM's embeddings of the rendered demonstrations
  icl-truncated  the last K of those tokens: ICL with the token budget of K vectors
  mend           the K vectors of each vectors folder (variants.py: the distill section's, and one per
                 distill.variants), each folder a row named by how its vectors were made: mend (the
                 trained distiller), mend+fit@N (then N steps on the set), fitted@N (N steps from the
                 anchors, no distiller). A file is used when it was made for this LLM and these
                 demonstrations, else the set's vectors are made now (refine.py)
  llmlingua      the K most informative of those tokens under the LLM (compress.py), once per set

The first three do not depend on the distiller: their scores are cached (eval_cache.py), so a new
distiller costs only its own scoring; their latency is timed again on a sample, so that it stands
beside the vectors rows' measured in the same run. Each vectors row minus ICL, minus zero-shot and
minus each later vectors row comes with a bootstrap interval over tasks and queries (bootstrap.py).
The scoring itself is shared with the trainer's curves (scoring.py); the results' shape and means
are results.py's, the table and files report.py's.
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..core.config import Recipe, TemplateSpec, resolved_dict
from ..core.partitions import Partition
from ..core.provenance import models_stamp, stamp, text_hash
from ..core.registry import get_backend
from ..core.vectors import VectorsMismatch, check_compatible, load_vectors
from ..data.workspace import data_dir, partition_for, vectors_path
from ..evaluation import eval_cache, flops, metrics, report
from ..evaluation.bootstrap import RESAMPLED, Paired, task_bootstrap, too_few
from ..evaluation.compress import NOTE, SEGMENT_TOKENS, Compressed, compress
from ..evaluation.results import Agreement, MethodResult, SetResult, TaskResult, mean_agreement, summarize
from ..evaluation.scoring import DemoSet, MethodRun, QuerySet, demo_sets, option_losses, predicted, quality, query_set, score
from ..models.backend import Models
from ..models.distiller import tokens_read
from ..models.render import context_ids
from ..training.refine import refine_flops, refinement, refinement_of, set_vectors
from ..training.trained import UNTRAINED, load_trained
from ..training.variants import METHOD, Variant, made_by, method_of, needing_distiller, ordered, row_name, variants


@dataclass
class MendVectors:
    vectors: torch.Tensor
    source: dict  # file or distilled now, and by which distiller: recorded in the results
    distill_flops: float


@dataclass
class EvalRun:
    """What every method on every set of one `mendctl eval` reads, built once when it starts."""

    recipe: Recipe
    models: Models
    distiller_hash: str  # UNTRAINED when the recipe has no trained distiller
    template: TemplateSpec
    partition: Partition
    data: Path  # the task folder
    methods: list[str]  # the table's rows: eval.methods with `mend` replaced by the vectors rows
    limit: int | None
    device: str  # as the results and the baseline cache name it
    vectors: dict[str, dict[str, MendVectors]] = field(default_factory=dict)  # row -> set key -> its vectors
    folders: dict[str, dict] = field(default_factory=dict)  # row -> how its vectors were made, and where


def _device_name(device: torch.device) -> str:
    return f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "cpu"


def _context(recipe: Recipe, limit: int | None) -> EvalRun:
    models, distiller_hash = load_trained(needing_distiller(recipe), require=False)
    return EvalRun(recipe, models, distiller_hash, get_backend(recipe.backend).template(recipe), partition_for(recipe),
                   data_dir(recipe), list(recipe.eval.methods), limit, _device_name(models.llm.device))


# --------------------------------------------------------------------------- inputs


def _saved_vectors(run: EvalRun, variant: Variant, ds: DemoSet) -> tuple[torch.Tensor | None, dict]:
    """The vectors file of a demonstration set if it was made for this LLM and these demonstrations."""
    path = vectors_path(run.recipe, ds.task, ds.seed, variant.folder)
    if not path.is_file():
        return None, {"source": "distilled", "reason": f"no file {path}"}
    try:
        vf = load_vectors(path)
        check_compatible(vf, run.models.llm_config_hash, run.models.llm.hidden_size, str(path))
        refined = refinement_of(vf.metadata, str(path))
    except VectorsMismatch as e:  # unreadable, or made for another LLM: distill this set now instead
        return None, {"source": "distilled", "reason": str(e)}
    if vf.metadata["demos_hash"] != text_hash(ds.context):
        return None, {"source": "distilled", "reason": f"{path} was made from other demonstrations"}
    # Files made before the method was recorded: it follows from their refinement.
    return vf.vectors, {"source": "file", "path": str(path), "distiller_hash": vf.metadata["distiller_hash"],
                        **refined, METHOD: vf.metadata.get(METHOD) or method_of(refined)}


def _variant_vectors(run: EvalRun, variant: Variant, sets: list[DemoSet], console: Console) -> dict[str, MendVectors]:
    recipe, models, distiller_hash = variant.recipe, run.models, run.distiller_hash
    saved = {f"{ds.task}/{ds.seed}": _saved_vectors(run, variant, ds) for ds in sets}
    todo = [ds for ds in sets if saved[f"{ds.task}/{ds.seed}"][0] is None]
    if todo and distiller_hash == UNTRAINED and recipe.distill.refine_from == "distiller":
        first = saved[f"{todo[0].task}/{todo[0].seed}"][1]["reason"]
        raise FileNotFoundError(
            f"`mend` needs the vectors in {variant.folder}/ of {len(todo)} demonstration set(s) ({first}) and there "
            f"is no trained distiller under {recipe.output_dir}: run `mendctl finetune` and `mendctl distill` first, "
            "set distill.checkpoint, or leave mend out of eval.methods")
    stale = {s["distiller_hash"] for v, s in saved.values() if v is not None} - {distiller_hash, UNTRAINED}
    if stale and distiller_hash != UNTRAINED:
        console.print(f"[yellow]warning[/]: some vectors files in {variant.folder} were made by another distiller "
                      f"than {distiller_hash}: run `mendctl distill --force` to remake them")
    made = _distill_now(run, recipe, todo)
    out = {}
    for ds in sets:
        key = f"{ds.task}/{ds.seed}"
        vectors, source = saved[key]
        if vectors is None:
            done = refinement(recipe.distill)
            vectors, source = made[key], source | {"distiller_hash": made_by(recipe.distill, distiller_hash), **done,
                                                METHOD: method_of(done)}
        llm = models.llm
        distilled = 0.0  # from the anchors no distiller ran: the refinement is the whole cost
        if source["refine_from"] == "distiller":
            read = tokens_read(models, ds.context, recipe.distiller.max_length)
            distilled = flops.distill_flops(models.distiller.body.config, read, models.distiller.num_vectors,
                                            causal=models.distiller.causal, gated_mlp=models.gated_mlp)
        cost = distilled + refine_flops(llm.model.config, recipe.num_vectors, ds.demos, run.template,
                                        models.llm_tokenizer, source["refine_steps"], llm.is_encoder_decoder,
                                        models.gated_mlp, source["refine_on"])
        out[key] = MendVectors(vectors.to(models.llm.device, models.llm.dtype), source, cost)
    return out


def _vectors_rows(run: EvalRun, sets: list[DemoSet], console: Console) -> None:
    """run.vectors and run.folders: one row per vectors folder, named by how its vectors were made."""
    made: dict[str, tuple[str, int]] = {}
    for i, variant in enumerate(variants(run.recipe)):
        vectors = _variant_vectors(run, variant, sets, console)
        kinds = {(v.source[METHOD], v.source["refine_steps"]) for v in vectors.values()}
        if len(kinds) > 1:
            raise VectorsMismatch(f"{run.recipe.output_dir / variant.folder}: its sets' vectors were made in "
                                  f"different ways ({sorted(kinds)}): remake them with `mendctl distill --force`")
        (method, steps), = kinds
        name = row_name(method, steps)
        name = name if name not in made else f"{name}#{i + 1}"  # two variants of one method and step count
        made[name] = (method, steps)
        run.vectors[name] = vectors
        run.folders[name] = {"dir": str(run.recipe.output_dir / variant.folder), "method": method,
                             "refine_steps": steps, "changes": variant.keys}
    at = run.methods.index("mend")
    run.methods[at:at + 1] = ordered(made)


def _distill_now(run: EvalRun, recipe: Recipe, todo: list[DemoSet]) -> dict[str, torch.Tensor]:
    if not todo:
        return {}
    vectors = set_vectors(recipe, run.models, run.template, todo, run.recipe.eval.batch_size)
    return {f"{ds.task}/{ds.seed}": v for ds, v in zip(todo, vectors)}


def _compressed(qs: QuerySet, models: Models, template: TemplateSpec, k: int) -> dict[str, Compressed]:
    return {qs.key: compress(models.llm, context_ids(template, qs.demos.context, models.llm_tokenizer), k,
                             models.gated_mlp)}


def _prefix(method: str, qs: QuerySet, models: Models, template: TemplateSpec, k: int,
            vectors: dict[str, dict[str, MendVectors]], lingua: dict[str, Compressed] | None = None) -> torch.Tensor:
    llm = models.llm
    if method in vectors:
        return vectors[method][qs.key].vectors
    ids = context_ids(template, qs.demos.context, models.llm_tokenizer) if method != "zero-shot" else []
    if method == "icl-truncated":
        ids = ids[-k:]
    elif method == "llmlingua":
        ids = lingua[qs.key].ids
    return llm.embed(torch.tensor(ids, dtype=torch.long, device=llm.device))


# --------------------------------------------------------------------------- scoring


def _warm_up(llm, qs: QuerySet) -> None:
    # The first call pays one-off costs (kernel selection, allocator growth) that belong to no method.
    option_losses(llm, llm.embed(torch.zeros(1, dtype=torch.long, device=llm.device)), qs.queries[0])


def _run_method(run: EvalRun, method: str, qs: QuerySet, advance) -> tuple[MethodRun, int, bool, int]:
    """The method's scores on `qs`, from the cache when they do not depend on the distiller and are there,
    and on how many queries this run timed it."""
    recipe, models, k = run.recipe, run.models, run.recipe.num_vectors
    description = None
    if recipe.eval.cache and method in eval_cache.CACHED_METHODS:
        description = eval_cache.describe(models, run.template, run.data, recipe.tasks.k, qs, method, k, run.limit,
                                          run.device)

    def compute(on: QuerySet, step=lambda: advance(1)) -> tuple[MethodRun, int]:
        # Compressed once per set, and only when not cached: the compression is llmlingua's dearest part.
        lingua = _compressed(on, models, run.template, k) if method == "llmlingua" else None
        prefix = _prefix(method, on, models, run.template, k, run.vectors, lingua)
        scored = score(models.llm, prefix, on, models.gated_mlp, step)
        if lingua:
            scored.prefix_flops = lingua[on.key].flops
        return scored, prefix.shape[0]

    scored, prefix_tokens, cached = eval_cache.load_or_score(description, lambda: compute(qs))
    if not cached:
        return scored, prefix_tokens, cached, len(qs.queries)
    advance(len(qs.queries))
    sample = min(recipe.eval.retime_queries, len(qs.queries))
    if sample:
        _retime(scored, compute(_first(qs, sample), lambda: None)[0], len(qs.queries), models.llm.device)
    return scored, prefix_tokens, cached, sample


def _first(qs: QuerySet, n: int) -> QuerySet:
    return replace(qs, queries=qs.queries[:n], alone=qs.alone[:n], options=qs.options[:n], golds=qs.golds[:n],
                   where=qs.where[:n])


def _retime(cached: MethodRun, timed: MethodRun, n: int, device: torch.device) -> None:
    """`cached`'s latency (and on a GPU its peak memory) as measured now on a sample of its queries: the
    sample's time per query, with the prefix's one-off time shared over the whole set as scoring it would."""
    per_query = statistics.fmean(timed.seconds) - timed.prefix_seconds / len(timed.seconds) + timed.prefix_seconds / n
    cached.seconds = [per_query] * n
    if device.type == "cuda":  # on CPU memory is an estimate from the lengths of every query: kept
        cached.memory_bytes = timed.memory_bytes


def _evaluate_set(run: EvalRun, qs: QuerySet, progress: Progress, bar) -> SetResult:
    classification = run.partition.is_classification(qs.demos.task)
    result, scored = SetResult(len(qs.queries), text_hash(qs.demos.context), qs.available), {}
    for method in run.methods:
        progress.update(bar, description=f"{qs.demos.task} seed {qs.demos.seed} {method}")
        scored[method], prefix_tokens, cached, timed = _run_method(run, method, qs,
                                                                   lambda n: progress.advance(bar, n))
        s = scored[method]
        result.methods[method] = MethodResult(
            score=quality(s.predictions, qs, classification), n=len(qs.queries), prefix_tokens=prefix_tokens,
            flops_per_query=statistics.fmean(s.flops), latency_ms_per_query=1000 * statistics.fmean(s.seconds),
            memory_bytes=s.memory_bytes, predictions=s.predictions, from_cache=cached, timed_queries=timed,
            distill_flops=run.vectors[method][qs.key].distill_flops if method in run.vectors else None,
            compress_flops=s.prefix_flops if method == "llmlingua" else None)
        if not progress.console.is_terminal:  # the bar is invisible in a log file: one line per method
            progress.console.print(f"eval {qs.demos.task} seed {qs.demos.seed} {method}: "
                                   f"{100 * result.methods[method].score:.1f}")
    if "icl" in run.methods:
        for row in run.vectors:
            result.vs_icl[row] = Agreement(metrics.agreement(scored["icl"].predictions, scored[row].predictions),
                                           metrics.mean_kl(scored["icl"].losses, scored[row].losses))
    return result


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("queries"),
                    TimeElapsedColumn(), console=console)


def _differences(run: EvalRun) -> list[tuple[str, str]]:
    """(a, b) for each interval of a - b: every vectors row against the baselines, and against each later row."""
    rows = [m for m in run.methods if m in run.vectors]
    pairs = [(a, b) for a in rows for b in ("icl", "zero-shot") if b in run.methods]
    return pairs + [(a, b) for i, a in enumerate(rows) for b in rows[i + 1:]]


def _bootstrap(run: EvalRun, sets: list[QuerySet], tasks: dict[str, TaskResult]) -> dict:
    recipe = run.recipe
    few = too_few(len(tasks), min(len(qs.queries) for qs in sets))
    out = {"samples": recipe.eval.bootstrap_samples, "seed": recipe.eval.bootstrap_seed, "level": 0.95,
           "resampled": RESAMPLED, "differences": []}
    for a, b in _differences(run):
        paired: dict[str, list[Paired]] = {}
        for qs in sets:
            scored = tasks[qs.demos.task].seeds[str(qs.demos.seed)].methods
            paired.setdefault(qs.demos.task, []).append(Paired(
                run.partition.is_classification(qs.demos.task), qs.golds, predicted(scored[a].predictions, qs),
                predicted(scored[b].predictions, qs)))
        ci = task_bootstrap(list(paired.values()), recipe.eval.bootstrap_samples, recipe.eval.bootstrap_seed)
        # Too few tasks or queries: the estimate stands, an interval would only look precise.
        out["differences"].append({"a": a, "b": b, **({"estimate": ci["estimate"], "too_few": few} if few else ci)})
    return out


# --------------------------------------------------------------------------- the command


@torch.no_grad()
def run_eval(recipe: Recipe, limit: int | None = None, console: Console | None = None) -> dict:
    """Evaluates recipe.eval.methods on the test tasks; writes output_dir/eval/results.{json,md}; returns them."""
    console = console or Console()
    run = _context(recipe, limit)
    tok = run.models.llm_tokenizer
    sets = [query_set(run.data, ds, recipe.tasks.k, run.template, tok, limit)
            for ds in demo_sets(recipe, run.template, tok)]
    if "mend" in run.methods:
        _vectors_rows(run, [qs.demos for qs in sets], console)
    _warm_up(run.models.llm, sets[0])
    tasks: dict[str, TaskResult] = {}
    with _progress(console) as progress:
        bar = progress.add_task("eval", total=sum(len(qs.queries) for qs in sets) * len(run.methods))
        for qs in sets:
            task = tasks.setdefault(qs.demos.task, TaskResult(
                "macro-f1" if run.partition.is_classification(qs.demos.task) else "accuracy"))
            task.seeds[str(qs.demos.seed)] = _evaluate_set(run, qs, progress, bar)
    results = _results(run, tasks, sets)
    if recipe.eval.bootstrap_samples and run.vectors:
        results["bootstrap"] = _bootstrap(run, sets, tasks)
    report.write(results, recipe.output_dir / "eval", console)
    return results


def _partial(sets: list[QuerySet]) -> str | None:
    """Why the run scored less than the test sets hold, or None."""
    scored, available = sum(len(qs.queries) for qs in sets), sum(qs.available for qs in sets)
    return None if scored == available else f"{scored} of the {available} test queries scored (--limit)"


def _results(run: EvalRun, tasks: dict[str, TaskResult], sets: list[QuerySet]) -> dict:
    """The results in the layout of results.json (docs/evaluation.md)."""
    recipe, methods, llm = run.recipe, run.methods, run.models.llm
    partial = _partial(sets)
    results = {
        "partition": run.partition.name, "device": run.device, "limit": run.limit, "seeds": recipe.tasks.seeds,
        "partial": partial is not None, **({"partial_reason": partial} if partial else {}),
        "queries": {"scored": sum(len(qs.queries) for qs in sets), "available": sum(qs.available for qs in sets)},
        "methods": methods, "num_vectors": recipe.num_vectors,
        "memory_kind": "cuda_peak_allocated" if llm.device.type == "cuda" else "estimated",
        "llm_weights_bytes": sum(p.numel() * p.element_size() for p in llm.parameters()),
        "aggregate": {m: s.as_dict() for m, s in summarize(tasks, methods).items()},
        "tasks": {name: task.as_dict() for name, task in tasks.items()},
    }
    if "icl" in methods and run.vectors:
        results["vs_icl"] = {row: asdict(mean_agreement(tasks, row)) for row in run.vectors}
    if run.vectors:
        results["vectors"] = {row: {**run.folders[row], "sources": {key: v.source for key, v in vectors.items()}}
                              for row, vectors in run.vectors.items()}
    if "llmlingua" in methods:
        results["llmlingua"] = {"implementation": NOTE, "segment_tokens": SEGMENT_TOKENS}
    results["models"] = models_stamp(run.models, run.distiller_hash, recipe.backend)
    results["recipe"] = resolved_dict(recipe)
    results["provenance"] = stamp()
    return results
