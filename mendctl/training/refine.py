"""Distilled vectors refined on their own demonstrations (distill.refine_steps).

A few Adam steps on the vectors alone, after the distiller made them: on leave-one-out episodes of
the set's k demonstrations (the query is demonstration i, the teacher is the LLM reading the other
k - 1 as ICL), the LLM reading the vectors is brought closer to the LLM reading the demonstrations,
by the KL over every query token (or, with distill.refine_on: options, over the distribution across
the demonstration's options). It needs the demonstrations and nothing else, runs once per set,
and a query then costs what it cost before; the one-off cost is `refine_flops`. With
distill.refine_from: anchors the steps start from the anchors' embeddings and no distiller runs:
vectors fitted to each set alone, a per-set prompt tuning.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from pydantic import ValidationError

from ..core.config import DistillSpec, Recipe, TemplateSpec
from ..core.provenance import text_hash
from ..core.vectors import WEIGHTS_KEY, VectorsMismatch
from ..evaluation import flops
from ..models.anchors import anchor_embeddings, set_anchors
from ..models.distiller import distill
from ..models.render import context_ids, render_context, render_query
from .losses import ForwardKL, OptionKL

REFINE_KEYS = ("refine_steps", "refine_lr", "refine_from", "refine_on", "refine_ce_weight")


def refinement(spec: DistillSpec) -> dict:
    """The distill keys that shape a set's vectors after (or instead of) the distiller."""
    return {k: getattr(spec, k) for k in REFINE_KEYS}


def refinement_of(metadata: dict[str, str], where: str) -> dict:
    """refinement() of the recipe that made the vectors file `where`, from its metadata; a key it lacks
    was at its default (files record only what differs, so those made before a key existed stay valid)."""
    def value(text: str):
        # metadata holds text: "30" is read back as the number it was written from, as a recipe holds it
        try:
            return json.loads(text)
        except (TypeError, ValueError):
            return text

    try:
        return refinement(DistillSpec(**{k: value(metadata[k]) for k in REFINE_KEYS if k in metadata}))
    except ValidationError as e:
        bad = "; ".join(f"{err['loc'][0]}={err['input']!r}: {err['msg']}" for err in e.errors())
        raise VectorsMismatch(f"{where}: its refinement metadata is not valid ({bad})") from None


def recorded(spec: DistillSpec) -> dict:
    """What a vectors file records of refinement(spec): the keys off their defaults."""
    default = refinement(DistillSpec())
    return {k: v for k, v in refinement(spec).items() if v != default[k]}


def vectors_metadata(recipe: Recipe, models, distiller_hash: str, template: TemplateSpec, ds, weights: str) -> dict:
    """What a vectors file records of the set `ds` (a scoring.DemoSet) and of what made its vectors
    (`distiller_hash` as variants.made_by gives it; `weights`, the LLM weights' fingerprint)."""
    from .variants import METHOD, method_of  # here, not above: at module level the import chain grows past 9

    return {"backend": recipe.backend, "llm_id": models.llm_id, "llm_config_hash": models.llm_config_hash,
            WEIGHTS_KEY: weights, "distiller_hash": distiller_hash, "task": ds.task, "seed": ds.seed,
            "num_demos": len(ds.demos), "demos_hash": text_hash(ds.context), "template": template.model_dump(),
            # Two anchor modes give different vectors from one untrained distiller (same weights hash).
            "anchor": recipe.distiller.anchor, **recorded(recipe.distill),
            METHOD: method_of(refinement(recipe.distill))}


def leave_one_out(template: TemplateSpec, demos: list[dict], tokenizer) -> list[tuple[list[int], list[int], list[int]]]:
    """(teacher context ids, x, y) of each demonstration as the query, the others as its context."""
    out = []
    for i, d in enumerate(demos):
        others = demos[:i] + demos[i + 1:]
        q = render_query(template, d["input"], [d["output"]], tokenizer, after_context=True)
        out.append((context_ids(template, render_context(template, others, tokenizer), tokenizer), q.x, q.options[0]))
    return out


def _option_texts(demo: dict) -> list[str]:
    """A demonstration's options; its own output when it lists none."""
    return demo.get("options") or [demo["output"]]


def demo_options(template: TemplateSpec, demos: list[dict], tokenizer) -> list[list[list[int]]]:
    """Each demonstration's options as its query's (LLM ids)."""
    return [render_query(template, d["input"], _option_texts(d), tokenizer, after_context=True).options for d in demos]


@dataclass
class OptionEpisodes:
    """A set's leave-one-out episodes scored on their options: each query's input and options, ICL's
    option losses on it (the teacher) and its gold option."""

    xs: list[torch.Tensor]
    options: list[list[torch.Tensor]]
    teacher: list[torch.Tensor]
    golds: list[int | None]  # None: the demonstration's output is not among its options

    def loss(self, student: list[torch.Tensor], ce_weight: float) -> torch.Tensor:
        """The option KL to ICL of the student's option losses, plus `ce_weight` times the gold options' mean."""
        loss = OptionKL()(self.teacher, student)
        if ce_weight:
            if None in self.golds:
                raise ValueError("a label loss needs every demonstration's output among its options")
            loss = loss + ce_weight * torch.stack([s[g] for s, g in zip(student, self.golds)]).float().mean()
        return loss


@torch.no_grad()
def option_episodes(llm, demos: list[dict], template: TemplateSpec, tokenizer, episodes: int | None = None,
                    ) -> OptionEpisodes:
    """The OptionEpisodes of the first `episodes` demonstrations (all by default)."""
    as_t = lambda ids: torch.tensor(ids, dtype=torch.long, device=llm.device)  # noqa: E731
    ctxs, xs, _ = zip(*leave_one_out(template, demos, tokenizer)[:episodes])
    xs = [as_t(x) for x in xs]
    options = [[as_t(o) for o in opts] for opts in demo_options(template, demos, tokenizer)[:episodes]]
    teacher = [llm.option_losses(llm.embed(as_t(c)), x, o) for c, x, o in zip(ctxs, xs, options)]
    golds = [opts.index(d["output"]) if d["output"] in opts else None
             for d, opts in ((d, _option_texts(d)) for d in demos[:episodes])]
    return OptionEpisodes(xs, options, teacher, golds)


def adam_steps(params: list[torch.Tensor], loss_of, steps: int, lr: float, after_step=None) -> None:
    """`steps` Adam steps on `params` down `loss_of()`; `after_step(n)`, when given, after each step n."""
    opt = torch.optim.Adam(params, lr=lr)
    with torch.enable_grad():
        for n in range(1, steps + 1):
            loss = loss_of()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if after_step is not None:
                after_step(n)


def refine(llm, vectors: torch.Tensor, demos: list[dict], template: TemplateSpec, tokenizer, steps: int,
           lr: float, on: str = "tokens", ce_weight: float = 0.0, after_step=None,
           episodes: int | None = None) -> torch.Tensor:
    """`vectors` [K, d] after `steps` Adam steps on the KL to ICL over the demonstrations' episodes,
    `on` their next-token distributions ("tokens") or their distributions over the options ("options"),
    plus (options only) `ce_weight` times the mean token loss of each demonstration's own label.
    `after_step(n, vectors)`, when given, sees the vectors after each step n (a curve over steps in one run).
    `episodes`: only the first that many demonstrations' episodes (each still with all the others as its
    context), a cheaper fit at the cost of fewer queries to fit on."""
    if steps == 0 or len(demos) < 2:  # one demonstration leaves no context to learn from
        return vectors
    fitted = vectors.detach().to(llm.dtype).clone().requires_grad_(True)
    if on == "options":
        ep = option_episodes(llm, demos, template, tokenizer, episodes)
        loss_of = lambda: ep.loss([llm.option_losses(fitted, x, o) for x, o in zip(ep.xs, ep.options)],  # noqa: E731
                                  ce_weight)
    else:
        as_t = lambda ids: torch.tensor(ids, dtype=torch.long, device=llm.device)  # noqa: E731
        ctxs, xs, ys = zip(*leave_one_out(template, demos, tokenizer)[:episodes])
        xs, ys = [as_t(x) for x in xs], [as_t(y) for y in ys]
        with torch.no_grad():
            teacher = llm.target_logits([llm.embed(as_t(c)) for c in ctxs], xs, ys).logits
        loss_of = lambda: ForwardKL()(teacher, llm.target_logits([fitted] * len(xs), xs, ys).logits)  # noqa: E731
    adam_steps([fitted], loss_of, steps, lr,
               None if after_step is None else lambda n: after_step(n, fitted.detach().clone()))
    return fitted.detach()


def refine_flops(llm_config, num_vectors: int, demos: list[dict], template: TemplateSpec, tokenizer, steps: int,
                 is_encoder_decoder: bool, gated_mlp: bool, on: str = "tokens") -> float:
    """What `refine` costs once per set: the teacher on each episode once, then per step the student's
    forward and backward (taken as twice the forward) on every episode."""
    if steps == 0 or len(demos) < 2:
        return 0.0
    episodes = leave_one_out(template, demos, tokenizer)
    read = ([[len(o) for o in opts] for opts in demo_options(template, demos, tokenizer)] if on == "options"
            else [[len(y)] for _, _, y in episodes])

    def forward(prefix: int, x: list[int], options: list[int]) -> float:
        return flops.llm_query_flops(llm_config, prefix, len(x), options, is_encoder_decoder, gated_mlp)

    teacher = sum(forward(len(c), x, o) for (c, x, _), o in zip(episodes, read))
    return teacher + steps * 3 * sum(forward(num_vectors, x, o) for (_, x, _), o in zip(episodes, read))


def set_vectors(recipe: Recipe, models, template: TemplateSpec, sets: list, batch_size: int) -> Iterator[torch.Tensor]:
    """Each demonstration set's vectors as `mendctl distill` writes them and `mendctl eval` makes them
    when no file has them: distilled (or the anchors) a batch at a time, then refined, set by set."""
    spec, tok = recipe.distill, models.llm_tokenizer
    for start in range(0, len(sets), batch_size):
        chunk = sets[start:start + batch_size]
        anchors = set_anchors(recipe, template, chunk, tok)
        starts = (list(anchor_embeddings(models.llm, anchors, recipe.num_vectors)) if spec.refine_from == "anchors"
                  else distill(models, [ds.context for ds in chunk], recipe.distiller.max_length, batch_size, anchors))
        for ds, v in zip(chunk, starts):
            yield refine(models.llm, v, ds.demos, template, tok, spec.refine_steps, spec.refine_lr, spec.refine_on,
                         spec.refine_ce_weight)
