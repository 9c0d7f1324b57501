"""Scores of the methods that do not depend on the distiller, kept across `mendctl eval` runs.

Zero-shot, ICL and truncated ICL read only the frozen LLM, the template and the task files: their
per-query option losses (and what computing them cost) are stored once under
`cache_dir()/eval/`, so evaluating a new distiller scores MEND alone. An entry is named by a hash
of everything its numbers depend on and also holds that description, which is compared in full on
reading: an entry made from other weights, another template or other data is never used.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from ..core.config import TemplateSpec
from ..core.fileio import write_json
from ..core.provenance import file_hash, text_hash
from ..data.metaicl import split_path
from ..models.backend import Models
from ..models.model_sources import cache_dir
from .scoring import MethodRun, QuerySet

CACHED_METHODS = ("zero-shot", "icl", "icl-truncated", "llmlingua")
VERSION = 2  # bumped when the scoring itself (FrozenLM.option_losses, compress.py) changes: every older entry turns stale


def describe(models: Models, template: TemplateSpec, root: Path, k: int, qs: QuerySet, method: str,
             num_vectors: int, limit: int | None, device: str) -> dict:
    """Everything a cached method's numbers depend on."""
    task, seed = qs.demos.task, qs.demos.seed
    return {"version": VERSION, "method": method, "llm_id": models.llm_id, "llm_config_hash": models.llm_config_hash,
            "dtype": str(models.llm.dtype), "bos_token_id": models.llm.bos_token_id, "device": device, "template": template.model_dump(),
            "demos_file": file_hash(split_path(root, task, k, seed, "train")),
            "queries_file": file_hash(split_path(root, task, k, seed, "test")),
            # What the LLM actually reads, so that a change in rendering or tokenization code shows too.
            "context": text_hash(qs.demos.context),
            "query_ids": text_hash(json.dumps([[q.x, q.options] for q in qs.queries + qs.alone])),
            "task": task, "seed": seed, "k": k, "limit": limit,
            "num_vectors": num_vectors if method in ("icl-truncated", "llmlingua") else None}


def _path(description: dict) -> Path:
    digest = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:24]
    return cache_dir() / "eval" / description["method"] / f"{digest}.json"


def load(description: dict) -> tuple[MethodRun, int] | None:
    """The cached run and its prefix length, or None when there is no entry for exactly this."""
    path = _path(description)
    try:
        entry = json.loads(path.read_text())
        if entry["description"] != description:
            return None
        return MethodRun(**entry["run"]), entry["prefix_tokens"]
    except (OSError, ValueError, KeyError, TypeError):  # absent or damaged: computed again
        return None


def save(description: dict, run: MethodRun, prefix_tokens: int) -> None:
    write_json(_path(description), {"description": description, "prefix_tokens": prefix_tokens, "run": asdict(run)})


def load_or_score(description: dict | None, compute: Callable[[], tuple[MethodRun, int]]) -> tuple[MethodRun, int, bool]:
    """The cached run and prefix length for `description`, else `compute()`'s, saved for the next run;
    and whether it came from the cache. `description` None: no caching, `compute()` every time."""
    if description is not None and (hit := load(description)) is not None:
        return *hit, True
    run, prefix_tokens = compute()
    if description is not None:
        save(description, run, prefix_tokens)
    return run, prefix_tokens, False
