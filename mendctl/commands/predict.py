"""`mendctl predict RECIPE --queries FILE.jsonl --out FILE.jsonl`: answers for a user's own queries,
after distilled vectors (mend), their demonstrations (icl) or nothing (zero-shot).

The output holds one row per query, in order, with the query's own fields and the answer; beside
it, OUT.meta.json says what made it (recipe, method, vectors, versions)."""
from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from ..api.mend import Mend, Vectors
from ..core.config import Recipe, resolved_dict
from ..core.fileio import atomic_path, write_json
from ..core.outputs import check_out
from ..core.provenance import file_hash, models_stamp, stamp
from ..data.rows import read_demos, read_queries
from ..training.refine import refinement_of
from ..training.variants import METHOD, method_of


def meta_path(out: Path) -> Path:
    return out.with_name(out.name + ".meta.json")


def made_with(vf: Vectors, where: str) -> str:
    """How the file's vectors were made (mend, mend+fit, fitted), as eval names its row."""
    return vf.metadata.get(METHOD) or method_of(refinement_of(vf.metadata, where))


def run_predict(recipe: Recipe, queries: Path, out: Path, method: str = "mend", vectors: Path | None = None,
                demos: Path | None = None, batch_size: int = 8, max_new_tokens: int = 32, force: bool = False,
                console: Console | None = None) -> list[dict]:
    console = console or Console()
    check_out(out, force)
    if method == "mend" and vectors is None:
        raise ValueError("--method mend needs --vectors FILE (from `mendctl distill RECIPE --demos ...`)")
    if method == "icl" and demos is None:
        raise ValueError("--method icl needs --demos FILE.jsonl")
    if method != "mend" and vectors is not None:
        raise ValueError(f"--vectors is read by --method mend only, not {method}")
    if method != "icl" and demos is not None:
        raise ValueError(f"--demos is read by --method icl only, not {method}")
    rows = read_queries(queries)  # the inputs first: a bad file fails before the models load
    demo_rows = read_demos(demos) if demos is not None else None
    mend = Mend.from_recipe(recipe)
    vf = Vectors.load(vectors, mend) if vectors is not None else None
    answers = mend.predict(vf, rows, method=method, demos=demo_rows, batch_size=batch_size,
                           max_new_tokens=max_new_tokens, progress=True)
    check_out(out, force)
    with atomic_path(out) as tmp, tmp.open("w") as f:
        for row in answers:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    write_json(meta_path(out), {
        "method": method, "queries": {"path": str(queries), "hash": file_hash(queries)},
        "vectors": None if vf is None else {"path": str(vectors), "task": vf.name,
                                            "demos_hash": vf.metadata["demos_hash"],
                                            "distiller_hash": vf.metadata["distiller_hash"],
                                            METHOD: made_with(vf, str(vectors))},
        "demos": None if demos is None else {"path": str(demos), "hash": file_hash(demos)},
        "max_new_tokens": max_new_tokens, "models": models_stamp(mend.models, mend.distiller_hash, recipe.backend),
        "recipe": resolved_dict(recipe), "provenance": stamp()})
    scored = sum("prediction" in r for r in answers)
    console.print(f"[green]answers[/]: {out} ({scored} scored, {len(answers) - scored} generated, {method})",
                  highlight=False)
    return answers
