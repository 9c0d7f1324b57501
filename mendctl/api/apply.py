"""The public `mendctl.apply`: a vectors file used with nothing but the LLM and its tokenizer."""
from __future__ import annotations

from pathlib import Path

from ..core.vectors import VectorsFile, check_model, load_vectors
from .mend import Mend


def apply(model, tokenizer, vectors: VectorsFile | str | Path, query: str, options: list[str]) -> dict:
    """Scores `options` for `query` with the LLM reading the vectors instead of the demonstrations.

    Needs only the LLM, its tokenizer and the file: no distiller. Returns the prediction and the
    mean per-token loss of each option (lower is better). `mendctl.Mend` does this and more.
    """
    vf = vectors if isinstance(vectors, VectorsFile) else load_vectors(vectors, model)
    if isinstance(vectors, VectorsFile):
        check_model(vf, model, "vectors")  # another LLM, or the same config with other weights, is refused
    mend = Mend.from_model(model, tokenizer, vf.metadata["backend"], vf.template)
    losses = [-s for s in mend.score_options(vf, [query], [options])[0]]
    return {"prediction": options[losses.index(min(losses))], "losses": dict(zip(options, losses))}
