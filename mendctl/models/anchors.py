"""Which of the LLM's own token embeddings an anchored distiller starts from (distiller.anchor).

Training (trainer.step_loss) and inference (distill.distill) both go through `anchor_ids`, from the
teacher-side ids of the rendered demonstrations and the ids of their outputs, so a distiller always
meets at inference the anchors it was trained on.
"""
from __future__ import annotations

import torch

from ..core.config import TemplateSpec
from .render import context_ids, render_query


def label_ids(template: TemplateSpec, demos: list[dict], tokenizer) -> list[list[int]]:
    """LLM ids of each demonstration's output, in order, each tokenised as a query's option is."""
    return [render_query(template, "", [d["output"]], tokenizer, after_context=False).options[0] for d in demos]


def _label_set(labels: list[list[int]]) -> list[list[int]]:
    """Each distinct output once, in the order of its last appearance."""
    last = {tuple(ids): n for n, ids in enumerate(labels)}
    return [list(ids) for ids in sorted(last, key=last.get)]


def anchor_ids(anchor: str, ctx: list[int], labels: list[list[int]], k: int) -> list[int]:
    """At most k LLM ids: `last`, the last k tokens of the demonstrations as the LLM reads them
    (what icl-truncated reads); `labels`, the last k tokens of the demonstrations' outputs;
    `label_set`, the last k tokens of the distinct outputs, each once (a long label space, seven
    labels of four tokens, fits in K where `labels` repeats the last few); `label_set_filled`, the
    same with the slots it leaves free taken by the demonstrations' last tokens before it, so that
    two one-token labels leave no zero vector in K. The label anchors take the demonstrations' last
    tokens when there are no outputs (stage-1 text)."""
    if anchor == "last" or (anchor in ("labels", "label_set", "label_set_filled") and not labels):
        return ctx[-k:]
    if anchor == "labels":
        return [i for ids in labels for i in ids][-k:]
    if anchor in ("label_set", "label_set_filled"):
        ids = [i for ids in _label_set(labels) for i in ids][-k:]
        free = k - len(ids) if anchor == "label_set_filled" else 0
        return (ctx[-free:] if free else []) + ids
    raise ValueError(f"no anchors for distiller.anchor={anchor!r}")


def anchor_embeddings(llm, rows: list[list[int]], k: int) -> torch.Tensor:
    """[B, k, d_llm] frozen LLM input embeddings of each row's ids, LEFT-padded with zero vectors
    when a row has fewer than k ids (a zero vector adds nothing a correction must undo)."""
    out = torch.zeros(len(rows), k, llm.hidden_size, dtype=llm.dtype, device=llm.device)
    for i, ids in enumerate(rows):
        if ids:
            with torch.no_grad():
                out[i, k - len(ids):] = llm.embed(torch.tensor(ids, dtype=torch.long, device=llm.device))
    return out


def set_anchors(recipe, template: TemplateSpec, sets, tokenizer) -> list[list[int]] | None:
    """The LLM ids an anchored distiller starts from for each set, as training computes them; None unanchored."""
    if recipe.distiller.anchor == "none":
        return None
    return [anchor_ids(recipe.distiller.anchor, context_ids(template, ds.context, tokenizer),
                       label_ids(template, ds.demos, tokenizer), recipe.num_vectors) for ds in sets]
