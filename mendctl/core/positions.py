"""How many positions the LLM and the distiller read, and what a recipe asks of them.

A model with learned absolute positions (GPT-2: 1024) fails with an index error past its last one.
`recipe_problems` finds from the configs what no input can fit (validate reports it before any
model loads); inputs that only some data overflow are cut from the left at run time, as MetaICL
does (lm.py, distiller.py), never crash.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from .config import RANDOM_INIT_POSITIONS, ModelSpec, Recipe, TemplateSpec


def max_positions(config) -> int | None:
    """The number of positions a model reads, or None when it has no limit (relative positions: T5)."""
    if getattr(config, "relative_attention_num_buckets", None) is not None:
        return None
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _config(spec: ModelSpec):
    """What the model's config says of its positions, when it costs nothing to know: a random_init
    model is built with RANDOM_INIT_POSITIONS, a local folder has its config.json (read as plain JSON:
    validate imports neither torch nor transformers)."""
    if spec.random_init is not None:
        return SimpleNamespace(max_position_embeddings=RANDOM_INIT_POSITIONS)
    source = getattr(spec, "source", None)
    path = Path(source).expanduser() / "config.json" if source else None
    if path is not None and spec.gguf_file is None and path.is_file():
        config = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
        return SimpleNamespace(**config)
    return None


def recipe_problems(recipe: Recipe) -> list[tuple[str, str]]:
    """(key, message) for each length the recipe asks for that its models cannot read."""
    problems = []

    def config(key: str, spec: ModelSpec):
        try:
            return _config(spec)
        except Exception as e:  # a damaged or unreadable config.json
            problems.append((key, f"cannot read {spec.source}/config.json ({type(e).__name__}: {str(e)[:200]})"))
            return None

    llm_config = config("llm.source", recipe.llm)
    if recipe.distiller.init_from_llm_layers:
        distiller_config = llm_config
    else:
        distiller_config = config("distiller.source", recipe.distiller)
    k = recipe.num_vectors
    d_max = max_positions(distiller_config) if distiller_config is not None else None
    if d_max is not None:
        if k >= d_max:
            problems.append(("num_vectors", f"{k} placeholders leave no room for demonstrations in the distiller's "
                                            f"{d_max} positions"))
        elif recipe.distiller.max_length + k > d_max:
            problems.append(("distiller.max_length", f"{recipe.distiller.max_length} + {k} placeholders exceeds the "
                                                     f"distiller's {d_max} positions: use at most {d_max - k}"))
    l_max = max_positions(llm_config) if llm_config is not None else None
    if l_max is not None:
        template = recipe.template or _default_template(recipe.backend)
        if k >= l_max:
            problems.append(("num_vectors", f"{k} vectors leave no room for the query in the LLM's {l_max} positions"))
        if template.max_context_tokens + template.max_example_tokens >= l_max:
            key = "template.max_context_tokens" if recipe.template else "template (the backend's default)"
            problems.append((key, f"max_context_tokens {template.max_context_tokens} + max_example_tokens "
                                  f"{template.max_example_tokens} leave no room for an option in the LLM's "
                                  f"{l_max} positions"))
        if recipe.pretrain is not None and recipe.pretrain.max_length > l_max:
            problems.append(("pretrain.max_length", f"{recipe.pretrain.max_length} exceeds the LLM's {l_max} "
                                                    "positions (the teacher reads a whole passage)"))
    return problems


def _default_template(backend: str) -> TemplateSpec:
    from .registry import load  # the backend's module, and so torch: only for a recipe without a template

    return load(backend).default_template
