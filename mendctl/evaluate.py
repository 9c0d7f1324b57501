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
                 this LLM and these demonstrations, else distilled now from the trained distiller (and
                 refined on the set's own demonstrations with distill.refine_steps: refine.py)
  llmlingua      the K most informative of those tokens under the LLM (compress.py), once per set

The first three do not depend on the distiller: their scores are cached (eval_cache.py), so a new
distiller costs only its own scoring. MEND minus ICL and minus zero-shot come with paired bootstrap
intervals (bootstrap.py). The scoring itself is shared with the trainer's curves (scoring.py); the
results' shape and means are results.py's, the table and files report.py's.
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from . import eval_cache, flops, metrics, report
from .backend import Models
from .bootstrap import Paired, paired_bootstrap
from .compress import NOTE, SEGMENT_TOKENS, Compressed, compress
from .config import Recipe, TemplateSpec, resolved_dict
from .distiller import tokens_read
from .partitions import Partition
from .provenance import models_stamp, stamp, text_hash, weights_fingerprint
from .refine import refine_flops, refinement, refinement_of, set_vectors
from .registry import get_backend
from .render import context_ids
from .results import Agreement, MethodResult, SetResult, TaskResult, mean_agreement, summarize
from .scoring import DemoSet, MethodRun, QuerySet, demo_sets, option_losses, predicted, quality, query_set, score
from .trained import UNTRAINED, load_trained
from .vectors import VectorsMismatch, check_compatible, load_vectors
from .workspace import data_dir, partition_for, vectors_path


@dataclass
class EvalRun:
    """What every method on every set of one `mendctl eval` reads, built once when it starts."""

    recipe: Recipe
    models: Models
    distiller_hash: str  # UNTRAINED when the recipe has no trained distiller
    template: TemplateSpec
    partition: Partition
    data: Path  # the task folder
    methods: list[str]
    limit: int | None
    device: str  # as the results and the baseline cache name it


def _device_name(device: torch.device) -> str:
    return f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "cpu"


def _context(recipe: Recipe, limit: int | None) -> EvalRun:
    models, distiller_hash = load_trained(recipe, require=False)
    return EvalRun(recipe, models, distiller_hash, get_backend(recipe.backend).template(recipe), partition_for(recipe),
                   data_dir(recipe), list(recipe.eval.methods), limit, _device_name(models.llm.device))


@dataclass
class MendVectors:
    vectors: torch.Tensor
    source: dict  # file or distilled now, and by which distiller: recorded in the results
    distill_flops: float


# --------------------------------------------------------------------------- inputs


def _saved_vectors(run: EvalRun, ds: DemoSet, weights: str) -> tuple[torch.Tensor | None, dict]:
    """The vectors file of a demonstration set if it was made for this LLM (`weights`: its fingerprint)
    and these demonstrations."""
    path = vectors_path(run.recipe, ds.task, ds.seed)
    if not path.is_file():
        return None, {"source": "distilled", "reason": f"no file {path}"}
    try:
        vf = load_vectors(path)
        check_compatible(vf, run.models.llm_config_hash, run.models.llm.hidden_size, str(path), weights)
        refined = refinement_of(vf.metadata, str(path))
    except VectorsMismatch as e:  # unreadable, or made for another LLM: distill this set now instead
        return None, {"source": "distilled", "reason": str(e)}
    if vf.metadata["demos_hash"] != text_hash(ds.context):
        return None, {"source": "distilled", "reason": f"{path} was made from other demonstrations"}
    return vf.vectors, {"source": "file", "path": str(path), "distiller_hash": vf.metadata["distiller_hash"],
                        **refined}


def _mend_vectors(run: EvalRun, sets: list[DemoSet], console: Console) -> dict[str, MendVectors]:
    recipe, models, distiller_hash = run.recipe, run.models, run.distiller_hash
    weights = weights_fingerprint(models.llm.model)
    saved = {f"{ds.task}/{ds.seed}": _saved_vectors(run, ds, weights) for ds in sets}
    todo = [ds for ds in sets if saved[f"{ds.task}/{ds.seed}"][0] is None]
    if todo and distiller_hash == UNTRAINED and recipe.distill.refine_from == "distiller":
        first = saved[f"{todo[0].task}/{todo[0].seed}"][1]["reason"]
        raise FileNotFoundError(
            f"`mend` needs vectors for {len(todo)} demonstration set(s) ({first}) and there is no trained "
            f"distiller under {recipe.output_dir}: run `mendctl finetune` and `mendctl distill` first, "
            "set distill.checkpoint, or leave mend out of eval.methods")
    stale = {s["distiller_hash"] for v, s in saved.values() if v is not None} - {distiller_hash, UNTRAINED}
    if stale and distiller_hash != UNTRAINED:
        console.print(f"[yellow]warning[/]: some vectors files were made by another distiller than {distiller_hash}: "
                      "run `mendctl distill --force` to remake them")
    made = _distill_now(run, todo)
    out = {}
    for ds in sets:
        key = f"{ds.task}/{ds.seed}"
        vectors, source = saved[key]
        if vectors is None:
            vectors, source = made[key], source | {"distiller_hash": distiller_hash, **refinement(recipe.distill)}
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


def _distill_now(run: EvalRun, todo: list[DemoSet]) -> dict[str, torch.Tensor]:
    if not todo:
        return {}
    vectors = set_vectors(run.recipe, run.models, run.template, todo, run.recipe.eval.batch_size)
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


def _warm_up(llm, qs: QuerySet) -> None:
    # The first call pays one-off costs (kernel selection, allocator growth) that belong to no method.
    option_losses(llm, llm.embed(torch.zeros(1, dtype=torch.long, device=llm.device)), qs.queries[0])


def _run_method(run: EvalRun, method: str, qs: QuerySet, mend: dict[str, MendVectors], advance
                ) -> tuple[MethodRun, int, bool]:
    """The method's scores on `qs`, from the cache when they do not depend on the distiller and are there."""
    recipe, models, k = run.recipe, run.models, run.recipe.num_vectors
    description = None
    if recipe.eval.cache and method in eval_cache.CACHED_METHODS:
        description = eval_cache.describe(models, run.template, run.data, recipe.tasks.k, qs, method, k, run.limit,
                                          run.device)

    def compute() -> tuple[MethodRun, int]:
        # Compressed once per set, and only when not cached: the compression is llmlingua's dearest part.
        lingua = _compressed(qs, models, run.template, k) if method == "llmlingua" else None
        prefix = _prefix(method, qs, models, run.template, k, mend, lingua)
        scored = score(models.llm, prefix, qs, models.gated_mlp, lambda: advance(1))
        if lingua:
            scored.prefix_flops = lingua[qs.key].flops
        return scored, prefix.shape[0]

    scored, prefix_tokens, cached = eval_cache.load_or_score(description, compute)
    if cached:
        advance(len(qs.queries))
    return scored, prefix_tokens, cached


def _evaluate_set(run: EvalRun, qs: QuerySet, mend: dict[str, MendVectors], progress: Progress, bar) -> SetResult:
    classification = run.partition.is_classification(qs.demos.task)
    result, scored = SetResult(len(qs.queries), text_hash(qs.demos.context)), {}
    for method in run.methods:
        progress.update(bar, description=f"{qs.demos.task} seed {qs.demos.seed} {method}")
        scored[method], prefix_tokens, cached = _run_method(run, method, qs, mend, lambda n: progress.advance(bar, n))
        s = scored[method]
        result.methods[method] = MethodResult(
            score=quality(s.predictions, qs, classification), n=len(qs.queries), prefix_tokens=prefix_tokens,
            flops_per_query=statistics.fmean(s.flops), latency_ms_per_query=1000 * statistics.fmean(s.seconds),
            memory_bytes=s.memory_bytes, predictions=s.predictions, from_cache=cached,
            distill_flops=mend[qs.key].distill_flops if method == "mend" else None,
            compress_flops=s.prefix_flops if method == "llmlingua" else None)
        if not progress.console.is_terminal:  # the bar is invisible in a log file: one line per method
            progress.console.print(f"eval {qs.demos.task} seed {qs.demos.seed} {method}: "
                                   f"{100 * result.methods[method].score:.1f}")
    if {"icl", "mend"} <= set(run.methods):
        result.mend_vs_icl = Agreement(metrics.agreement(scored["icl"].predictions, scored["mend"].predictions),
                                       metrics.mean_kl(scored["icl"].losses, scored["mend"].losses))
    return result


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("queries"),
                    TimeElapsedColumn(), console=console)


def _bootstrap(run: EvalRun, sets: list[QuerySet], tasks: dict[str, TaskResult]) -> dict:
    recipe = run.recipe
    out = {"samples": recipe.eval.bootstrap_samples, "seed": recipe.eval.bootstrap_seed, "level": 0.95}
    for baseline in ("icl", "zero-shot"):
        if baseline not in run.methods:
            continue
        paired: dict[str, list[Paired]] = {}
        for qs in sets:
            scored = tasks[qs.demos.task].seeds[str(qs.demos.seed)].methods
            paired.setdefault(qs.demos.task, []).append(Paired(
                run.partition.is_classification(qs.demos.task), qs.golds, predicted(scored["mend"].predictions, qs),
                predicted(scored[baseline].predictions, qs)))
        out[f"mend_minus_{baseline}"] = paired_bootstrap(paired, recipe.eval.bootstrap_samples,
                                                         recipe.eval.bootstrap_seed)
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
    mend = _mend_vectors(run, [qs.demos for qs in sets], console) if "mend" in run.methods else {}
    _warm_up(run.models.llm, sets[0])
    tasks: dict[str, TaskResult] = {}
    with _progress(console) as progress:
        bar = progress.add_task("eval", total=sum(len(qs.queries) for qs in sets) * len(run.methods))
        for qs in sets:
            task = tasks.setdefault(qs.demos.task, TaskResult(
                "macro-f1" if run.partition.is_classification(qs.demos.task) else "accuracy"))
            task.seeds[str(qs.demos.seed)] = _evaluate_set(run, qs, mend, progress, bar)
    results = _results(run, tasks, mend)
    if recipe.eval.bootstrap_samples and "mend" in run.methods:
        results["bootstrap"] = _bootstrap(run, sets, tasks)
    report.write(results, recipe.output_dir / "eval", console)
    return results


def _results(run: EvalRun, tasks: dict[str, TaskResult], mend: dict[str, MendVectors]) -> dict:
    """The results in the layout of results.json (docs/evaluation.md)."""
    recipe, methods, llm = run.recipe, run.methods, run.models.llm
    results = {
        "partition": run.partition.name, "device": run.device, "limit": run.limit, "seeds": recipe.tasks.seeds,
        "methods": methods, "num_vectors": recipe.num_vectors,
        "memory_kind": "cuda_peak_allocated" if llm.device.type == "cuda" else "estimated",
        "llm_weights_bytes": sum(p.numel() * p.element_size() for p in llm.parameters()),
        "aggregate": {m: s.as_dict() for m, s in summarize(tasks, methods).items()},
        "tasks": {name: task.as_dict() for name, task in tasks.items()},
    }
    if {"icl", "mend"} <= set(methods):
        results["mend_vs_icl"] = asdict(mean_agreement(tasks))
    if mend:
        results["vectors"] = {"dir": str(recipe.output_dir / "vectors"),
                              "sources": {key: v.source for key, v in mend.items()}}
    if "llmlingua" in methods:
        results["llmlingua"] = {"implementation": NOTE, "segment_tokens": SEGMENT_TOKENS}
    results["models"] = models_stamp(run.models, run.distiller_hash, recipe.backend)
    results["recipe"] = resolved_dict(recipe)
    results["provenance"] = stamp()
    return results
