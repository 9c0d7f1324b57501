"""The Python API: a recipe's LLM (and distiller) as an object that distils a user's demonstrations
into vectors and answers queries after them (docs/api.md).

What the LLM reads before a query is one of three things: `Vectors` (MEND), a list of
demonstrations (ICL, rendered as eval renders them) or None (zero-shot). Queries are rendered with
the recipe's template exactly as eval renders them, and options are scored by eval's own scoring,
so a choice made here is the choice eval makes for the same vectors and query. The model calls go
through one `Engine` (engine.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.config import TRAINING_SECTIONS, Recipe, TemplateSpec, load_recipe
from ..core.provenance import weights_fingerprint
from ..data.metaicl import DataError
from ..data.rows import check_demos, check_queries, public
from ..core.vectors import VectorsFile, VectorsMismatch, check_compatible, file_metadata, load_vectors, save_vectors

METHODS = ("mend", "icl", "zero-shot")


@dataclass
class Vectors(VectorsFile):
    """One demonstration set's distilled vectors [K, d] and the metadata saying what made them."""

    @property
    def tensor(self) -> torch.Tensor:
        return self.vectors

    @property
    def name(self) -> str:
        return self.metadata["task"]

    @classmethod
    def load(cls, path: str | Path, mend: "Mend | None" = None) -> "Vectors":
        """Reads a vectors file; with `mend`, also checks it was made for mend's LLM and template."""
        vf = load_vectors(path)
        vectors = cls(vf.vectors, vf.metadata, vf.path)
        if mend is not None:
            mend.check(vectors)
        return vectors

    def save(self, path: str | Path) -> None:
        """Writes the file atomically (a reader never sees half of it)."""
        save_vectors(Path(path), self.vectors, self.metadata)


class Mend:
    """A recipe's frozen LLM, its template, and its distiller (trained when the recipe has one)."""

    def __init__(self, models, template: TemplateSpec, recipe: Recipe | None = None, distiller_hash: str = "",
                 engine=None):
        from .engine import TorchEngine

        self.models, self.template, self.recipe, self.distiller_hash = models, template, recipe, distiller_hash
        self.engine = engine or TorchEngine(models.llm, models.gated_mlp)

    # ------------------------------------------------------------------ building

    @classmethod
    def from_recipe(cls, recipe: str | Path | Recipe, overrides=(), *, distiller: str | Path | None = None) -> "Mend":
        """The recipe's LLM and distiller: `distiller` (a distiller file or checkpoint folder), else the
        recipe's distill.checkpoint, else its latest trained stage; none of these, the untrained one
        (`distill` then refuses unless allowed, see `distill`)."""
        from ..core.registry import get_backend
        from ..training.trained import load_trained

        if not isinstance(recipe, Recipe):
            recipe = load_recipe(recipe, list(overrides), unused=TRAINING_SECTIONS)
        elif overrides:
            raise ValueError("overrides apply to a recipe file; pass a Recipe already overridden")
        if distiller is not None:
            if not Path(distiller).exists():
                raise FileNotFoundError(f"{distiller}: no such distiller file or folder")
            recipe = recipe.model_copy(update={"distill": recipe.distill.model_copy(
                update={"checkpoint": Path(distiller)})})
        models, distiller_hash = load_trained(recipe, require=False)
        return cls(models, get_backend(recipe.backend).template(recipe), recipe, distiller_hash)

    @classmethod
    def from_model(cls, model, tokenizer, backend: str, template: TemplateSpec | dict) -> "Mend":
        """Scoring and generation only (no distiller), from a transformers LLM and its tokenizer."""
        from ..core.registry import get_backend
        from ..core.vectors import config_hash
        from ..models.backend import Models

        b = get_backend(backend)
        llm = b.frozen_lm(model, tokenizer)
        models = Models(llm, tokenizer, "", config_hash(model.config), None, None, b.gated_mlp)
        return cls(models, template if isinstance(template, TemplateSpec) else TemplateSpec(**template))

    # ------------------------------------------------------------------ the model

    @property
    def tokenizer(self):
        return self.models.llm_tokenizer

    @property
    def llm(self):
        """The underlying transformers model."""
        return self.models.llm.model

    @property
    def max_length(self) -> int | None:
        """Positions the LLM reads (BOS, prefix, query and answer together); None when unbounded."""
        lm = self.models.llm
        return None if lm.max_positions is None else lm.max_positions + lm.bos_len

    def check(self, vectors: VectorsFile) -> None:
        """Refuses vectors made for another LLM, or with another template than this recipe's."""
        where = str(vectors.path) if vectors.path else f"vectors {vectors.metadata.get('task', '')!r}"
        check_compatible(vectors, self.models.llm_config_hash, self.engine.hidden_size, where)
        try:  # a key the file lacks was at its default (files made before the key existed)
            made_with = TemplateSpec(**vectors.template).model_dump()
        except (ValueError, TypeError) as e:
            raise VectorsMismatch(f"{where}: its template metadata is not valid ({e})") from None
        if made_with != self.template.model_dump():
            raise VectorsMismatch(f"{where} was distilled with template {vectors.template}, not this recipe's "
                                  f"{self.template.model_dump()}: its queries would be rendered unlike its demonstrations")

    # ------------------------------------------------------------------ distilling

    def distill(self, demos: list[dict], name: str = "demos", *, untrained: bool = False) -> Vectors:
        """The demonstrations (dicts with input, output, optional options) distilled into K vectors,
        as `mendctl distill` distils a task's set. Without a trained distiller it refuses, unless
        `untrained` (vectors from the distiller's initial weights: for trying the commands out)."""
        from ..core.partitions import check_task_name
        from ..evaluation.scoring import DemoSet
        from ..models.render import render_context
        from ..training.refine import set_vectors, vectors_metadata
        from ..training.trained import UNTRAINED
        from ..training.variants import made_by

        if self.recipe is None or self.models.distiller is None:
            raise ValueError("this Mend has no distiller: build it with Mend.from_recipe")
        check_task_name(name)
        demos = check_demos(demos)
        recipe = self.recipe
        if self.distiller_hash == UNTRAINED and recipe.distill.refine_from == "distiller" and not untrained:
            raise FileNotFoundError(
                f"no trained distiller under {recipe.output_dir}: run `mendctl pretrain` and/or `mendctl finetune`, "
                "set distill.checkpoint, or allow the untrained distiller (--untrained; its vectors carry no skill)")
        ds = DemoSet(name, 0, [public(d) for d in demos], render_context(self.template, demos, self.tokenizer))
        if not ds.context:
            raise DataError(f"{name}: the demonstrations leave nothing within template.max_context_tokens")
        with torch.no_grad():
            tensor = next(set_vectors(recipe, self.models, self.template, [ds], 1)).detach().cpu()
        meta = vectors_metadata(recipe, self.models, made_by(recipe.distill, self.distiller_hash), self.template, ds,
                                weights_fingerprint(self.models.llm.model))
        meta.pop("seed")  # a user's demonstrations were drawn by no seed of the recipe's
        return Vectors(tensor, file_metadata(tensor, meta))

    # ------------------------------------------------------------------ what precedes a query

    def _prefix(self, before) -> torch.Tensor:
        """[P, d] embeddings the LLM reads before each query (BOS not included)."""
        from ..models.render import context_ids, render_context

        if before is None:
            return self.engine.embed([])
        if isinstance(before, VectorsFile):
            self.check(before)
            return before.vectors
        demos = check_demos(before)
        return self.engine.embed(context_ids(self.template, render_context(self.template, demos, self.tokenizer),
                                             self.tokenizer))

    def _before(self, vectors, method: str, demos):
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}: one of {', '.join(METHODS)}")
        if method == "mend":
            if vectors is None:
                raise ValueError("method mend needs vectors")
            return vectors
        if method == "icl":
            if demos is None:
                raise ValueError("method icl needs demonstrations (demos)")
            return demos
        return None

    # ------------------------------------------------------------------ answering

    def predict(self, vectors: Vectors | None, queries: list[dict], *, method: str = "mend",
                demos: list[dict] | None = None, batch_size: int = 8, max_new_tokens: int = 32,
                progress: bool = False) -> list[dict]:
        """Each query answered after the vectors (mend), the demonstrations (icl) or nothing (zero-shot).

        A query with "options" gets "prediction" (the option eval would choose) and "probs" (each
        option's probability: the softmax over options of minus its mean per-token loss, the score
        eval ranks by); one without gets "generated" (greedy, up to `max_new_tokens`, cut where the
        template's separator would start the next demonstration). Every other field is kept.
        """
        if batch_size < 1 or max_new_tokens < 1:
            raise ValueError("batch_size and max_new_tokens must be at least 1")
        queries = check_queries(queries)
        prefix = self._prefix(self._before(vectors, method, demos))
        scored = [i for i, q in enumerate(queries) if q.get("options")]
        free = [i for i, q in enumerate(queries) if not q.get("options")]
        out = [public(q) for q in queries]
        with _bar(progress, len(queries)) as advance:
            if scored:
                losses = self._option_losses(prefix, [queries[i] for i in scored], batch_size, advance)
                for i, loss in zip(scored, losses):
                    options = queries[i]["options"]
                    probs = torch.softmax(-torch.tensor(loss, dtype=torch.float64), 0).tolist()
                    out[i]["prediction"] = options[min(range(len(loss)), key=loss.__getitem__)]
                    out[i]["probs"] = dict(zip(options, probs))
            for start in range(0, len(free), batch_size):
                chunk = free[start:start + batch_size]
                texts = self._generate(prefix, [queries[i] for i in chunk], {"max_new_tokens": max_new_tokens})
                for i, text in zip(chunk, texts):
                    out[i]["generated"] = self._answer(text)
                    advance()
        return out

    def score_options(self, vectors, prompts: list[str], options: list[list[str]]) -> list[list[float]]:
        """Each prompt's options' mean per-token log-likelihood after `vectors`, as eval scores them
        (the highest is eval's prediction). `vectors`: Vectors, a list of demonstrations, or None."""
        if len(prompts) != len(options):
            raise ValueError(f"{len(prompts)} prompts but {len(options)} option lists")
        queries = check_queries([{"input": p, "options": o} for p, o in zip(prompts, options)], "prompts")
        losses = self._option_losses(self._prefix(vectors), queries, 8, lambda: None)
        return [[-x for x in loss] for loss in losses]

    def loglikelihood(self, vectors, contexts: list[str], continuations: list[str]) -> list[tuple[float, bool]]:
        """lm-eval's loglikelihood: each continuation's summed log-probability after `vectors` and the
        context (raw text, no template; the separator opens it when anything precedes), and whether
        greedy decoding would produce it."""
        if len(contexts) != len(continuations):
            raise ValueError(f"{len(contexts)} contexts but {len(continuations)} continuations")
        prefix = self._prefix(vectors)
        xs, ys = [], []
        for context, continuation in zip(contexts, continuations):
            y = _ids(self.tokenizer, continuation)
            if not y:
                raise ValueError(f"continuation {continuation!r} is empty")
            xs.append(self._context_ids(prefix, context))
            ys.append(y)
        return self.engine.continuation_logprobs(prefix, xs, ys)

    def generate(self, vectors, prompts: list[str], *, raw: bool = False, **generate_kwargs) -> list[str]:
        """Each prompt's continuation after `vectors` (Vectors, a list of demonstrations, or None),
        the prompt rendered with the template as a query, or with `raw` read as raw text as
        `loglikelihood` reads a context (lm-eval's prompts); transformers' generate(inputs_embeds=...)
        keyword arguments pass through (greedy and max_new_tokens=32 unless given). The raw text,
        nothing cut."""
        if raw:
            if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
                raise DataError("prompts: expected a list of strings")
            prefix = self._prefix(vectors)
            ids = self.engine.generate(prefix, [self._context_ids(prefix, p) for p in prompts], **generate_kwargs)
            return [self.tokenizer.decode(i, skip_special_tokens=True) for i in ids]
        queries = check_queries([{"input": p} for p in prompts], "prompts")
        return self._generate(self._prefix(vectors), queries, generate_kwargs)

    def prefix(self, before) -> torch.Tensor:
        """[P, d] input embeddings the LLM reads before each query, BOS not included: `before` is
        Vectors, a list of demonstrations, or None, as in every answering call. A server computes it
        once per task instead of once per request."""
        return self._prefix(before)

    # ------------------------------------------------------------------ shared

    def _rendered(self, prefix: torch.Tensor, query: dict, options: list[str]):
        from ..models.render import render_query

        return render_query(self.template, query["input"], options, self.tokenizer,
                            after_context=bool(prefix.shape[0]))

    def _context_ids(self, prefix: torch.Tensor, context: str) -> list[int]:
        """A raw context's ids after `prefix`: the separator opens it when anything precedes it."""
        tok = self.tokenizer
        x = _ids(tok, (self.template.separator + context) if prefix.shape[0] and context else context)
        if not x and not prefix.shape[0] and not self.models.llm.bos_len:
            x = [tok.eos_token_id]  # nothing to predict (or encode) from: lm-eval's convention
        return x

    def _where(self, rows: list[dict]) -> list[str]:
        return [r.get("_where", f"queries[{i}]") for i, r in enumerate(rows)]

    def _option_losses(self, prefix, rows: list[dict], pack: int, advance) -> list[list[float]]:
        queries = [self._rendered(prefix, r, r["options"]) for r in rows]
        return self.engine.option_losses(prefix, queries, self._where(rows), pack, advance)

    def _generate(self, prefix, rows: list[dict], kwargs: dict) -> list[str]:
        lm = self.models.llm
        xs = [self._rendered(prefix, r, []).x for r in rows]
        for where, x in zip(self._where(rows), xs):
            if not x and not prefix.shape[0] and not lm.bos_len:
                raise DataError(f"{where}: empty input and nothing before it: nothing to generate after")
        ids = self.engine.generate(prefix, xs, **kwargs)
        return [self.tokenizer.decode(i, skip_special_tokens=True) for i in ids]

    def _answer(self, text: str) -> str:
        """Generated text as an answer: what the template's output pattern puts before it dropped, and
        cut where the separator would start another demonstration."""
        lead = self.template.output.split("{output}", 1)[0]
        text = text.removeprefix(lead) if lead else text
        sep = self.template.separator
        if sep.strip() or "\n" in sep:  # a lone space would cut every answer after its first word
            text = text.split(sep, 1)[0]
        return text.strip()


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids if text else []


class _bar:
    """A progress bar over queries when asked for, else a no-op; yields the advance callback."""

    def __init__(self, show: bool, total: int):
        self.show, self.total, self.progress = show, total, None

    def __enter__(self):
        if not self.show:
            return lambda: None
        from rich.console import Console
        from rich.progress import Progress

        self.progress = Progress(console=Console(stderr=True))
        self.progress.start()
        task = self.progress.add_task("answering", total=self.total)
        return lambda: self.progress.advance(task)

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.stop()
        return False
