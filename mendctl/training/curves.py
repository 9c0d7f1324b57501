"""Learning curves: the distiller scored on held-out meta-train tasks while it trains, and their plot.

The validation tasks (`tasks.validation`) are meta-train tasks kept out of stage 2's examples. Each
gives `eval_sets` demonstration sets (its `_train` splits of the first recipe seeds), each with its
first `eval_queries` test queries, scored as `mendctl eval` scores them (mendctl/evaluation/scoring.py); each
score is a mean over a task's sets, then over the tasks, as `mendctl eval` averages. ICL and
zero-shot do not change while the distiller trains: they are scored once, when the run starts.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

from ..core.config import Recipe, TemplateSpec
from ..core.fileio import atomic_path
from ..data.workspace import data_dir
from ..evaluation import eval_cache, metrics
from ..evaluation.scoring import MethodRun, QuerySet, demo_set, predicted, query_set, score
from ..models.anchors import anchor_embeddings, set_anchors
from ..models.backend import Models
from ..models.distiller import distill
from ..models.render import context_ids


def correction_ratios(vectors: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """‖vector − anchor‖ / ‖anchor‖ of every slot [..., K, d] whose anchor is not zero (a zero anchor, a
    left pad, gets no correction), flattened."""
    norm = anchors.float().norm(dim=-1)
    return ((vectors.float() - anchors.float()).norm(dim=-1) / norm)[norm > 0]


def common_share(corrections: torch.Tensor) -> float:
    """The share of corrections [sets, K, d] (vectors minus anchors) that every set has in common: the
    squared norm of each slot's mean over the sets over the slot's mean squared norm, averaged over the
    slots. About 1/sets for corrections unrelated to one another, 1 for one shift whatever the set (a
    distiller that learnt a prompt for its training tasks instead of reading the demonstrations); 0
    where nothing moved."""
    c = corrections.float()
    total = c.pow(2).sum(-1).mean(0)  # [K]
    moved = total > 0
    if not moved.any():
        return 0.0
    return (c.mean(0).pow(2).sum(-1)[moved] / total[moved]).mean().item()


def _f1(run: MethodRun, qs: QuerySet) -> float:
    return metrics.macro_f1(predicted(run.predictions, qs), qs.golds)


def baseline(recipe: Recipe, models: Models, template: TemplateSpec, qs: QuerySet, method: str,
             queries: int | None) -> MethodRun:
    """ICL's or zero-shot's run on a query set of `queries` queries, from the cache `mendctl eval` fills
    (eval.cache): every run on the same queries, an ablation or a resumed run, scores them once."""
    llm, root = models.llm, data_dir(recipe)
    description = (eval_cache.describe(models, template, root, recipe.tasks.k, qs, method, recipe.num_vectors,
                                       queries, str(llm.device)) if recipe.eval.cache else None)
    ids = context_ids(template, qs.demos.context, models.llm_tokenizer) if method == "icl" else []
    prefix = llm.embed(torch.tensor(ids, dtype=torch.long, device=llm.device))
    return eval_cache.load_or_score(description, lambda: (score(llm, prefix, qs, models.gated_mlp),
                                                          prefix.shape[0]))[0]


class Validation:
    """The validation query sets with their ICL and zero-shot runs; `score` rates a distiller's vectors."""

    def __init__(self, recipe: Recipe, models: Models, template: TemplateSpec, queries: int, sets: int = 1):
        root, k, tok = data_dir(recipe), recipe.tasks.k, models.llm_tokenizer
        self.models = models
        self.sets = [query_set(root, demo_set(root, task, k, seed, template, tok), k, template, tok, queries)
                     for task in recipe.tasks.validation for seed in recipe.tasks.seeds[:sets]]
        self.anchors = set_anchors(recipe, template, [qs.demos for qs in self.sets], tok)
        with torch.no_grad():
            self.icl, self.zero_shot = ([baseline(recipe, models, template, qs, method, queries) for qs in self.sets]
                                        for method in ("icl", "zero-shot"))
        # Zero-shot's distance to ICL is the bar: vectors that carry the demonstrations sit closer.
        self.baselines = {"val_icl_f1": self._mean(map(_f1, self.icl, self.sets)),
                          "val_zero_shot_f1": self._mean(map(_f1, self.zero_shot, self.sets)),
                          **self._against_icl(self.zero_shot, "val_zero_shot_")}

    def _mean(self, values) -> float:
        """The mean over each task's sets, then over the tasks."""
        per_task: dict[str, list[float]] = {}
        for qs, value in zip(self.sets, values):
            per_task.setdefault(qs.demos.task, []).append(value)
        return statistics.fmean(statistics.fmean(v) for v in per_task.values())

    def _score(self, prefix: torch.Tensor, qs: QuerySet) -> MethodRun:
        return score(self.models.llm, prefix, qs, self.models.gated_mlp)

    @property
    def contexts(self) -> list[str]:
        return [qs.demos.context for qs in self.sets]

    def score_distiller(self, max_length: int, batch_size: int) -> dict:
        """`score` of the vectors the models' distiller makes of the validation demonstrations now; for an
        anchored distiller also how far they moved from their anchors, and how much of it all sets share."""
        vectors = distill(self.models, self.contexts, max_length, batch_size, self.anchors)
        scores = self.score(vectors)
        if self.anchors is not None:
            anchors = anchor_embeddings(self.models.llm, self.anchors, vectors[0].shape[0]).float()
            stacked = torch.stack(vectors).float()
            scores["val_correction"] = correction_ratios(stacked, anchors).mean().item()
            scores["val_correction_shared"] = common_share(stacked - anchors)
        return scores

    @torch.no_grad()
    def score(self, vectors: list[torch.Tensor]) -> dict:
        """MEND's macro-F1, agreement with ICL and KL(ICL || MEND), each a mean over the validation tasks."""
        mend = [self._score(v, qs) for v, qs in zip(vectors, self.sets)]
        return {"val_mend_f1": self._mean(map(_f1, mend, self.sets)), **self._against_icl(mend, "val_"),
                **self.baselines}

    def _against_icl(self, runs: list[MethodRun], prefix: str) -> dict:
        mean = self._mean
        return {f"{prefix}agreement": mean(metrics.agreement(i.predictions, r.predictions) for i, r in zip(self.icl, runs)),
                f"{prefix}kl": mean(metrics.mean_kl(i.losses, r.losses) for i, r in zip(self.icl, runs))}


def plot(metrics_path: Path, png: Path, title: str) -> None:
    """Training loss, KL and CE per step and, when logged, the validation scores against ICL and zero-shot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_mend_f1" in r]
    fig, axes = plt.subplots(1, 4 if val else 1, figsize=(16 if val else 5, 3.8), squeeze=False)
    ax = axes[0][0]
    for key in ("loss", "kl", "ce"):
        if any(r[key] for r in train):
            ax.plot([r["step"] for r in train], [r[key] for r in train], label=key)
    ax.set(xlabel="step", title=f"{title}: training")
    ax.legend()
    if val:
        steps = [r["step"] for r in val]
        ax = axes[0][1]
        ax.plot(steps, [100 * r["val_mend_f1"] for r in val], marker="o", label="mend")
        ax.axhline(100 * val[-1]["val_icl_f1"], color="tab:green", linestyle="--", label="icl")
        ax.axhline(100 * val[-1]["val_zero_shot_f1"], color="tab:gray", linestyle=":", label="zero-shot")
        ax.set(xlabel="step", ylabel="macro-F1 (%)", title="validation macro-F1")
        ax.legend()
        for ax, key, label in ((axes[0][2], "agreement", "agreement with icl"), (axes[0][3], "kl", "KL(icl || mend)")):
            ax.plot(steps, [r[f"val_{key}"] for r in val], marker="o", label="mend")
            if f"val_zero_shot_{key}" in val[-1]:
                ax.axhline(val[-1][f"val_zero_shot_{key}"], color="tab:gray", linestyle=":", label="zero-shot")
                ax.legend()
            ax.set(xlabel="step", title=f"validation {label}")
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
