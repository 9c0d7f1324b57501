"""The public `mendctl.apply`: a vectors file used with nothing but the LLM and its tokenizer."""
from __future__ import annotations

from pathlib import Path

import torch

from ..core.config import TemplateSpec
from ..core.registry import get_backend
from ..core.vectors import VectorsFile, check_model, load_vectors
from .render import render_query


def apply(model, tokenizer, vectors: VectorsFile | str | Path, query: str, options: list[str]) -> dict:
    """Scores `options` for `query` with the LLM reading the vectors instead of the demonstrations.

    Needs only the LLM, its tokenizer and the file: no distiller. Returns the prediction and the
    mean per-token loss of each option (lower is better).
    """
    vf = vectors if isinstance(vectors, VectorsFile) else load_vectors(vectors, model)
    if isinstance(vectors, VectorsFile):
        check_model(vf, model, "vectors")
    lm = get_backend(vf.metadata["backend"]).frozen_lm(model, tokenizer)
    q = render_query(TemplateSpec(**vf.template), query, options, tokenizer, after_context=True)
    device = lm.device
    with torch.no_grad():
        losses = lm.option_losses(vf.vectors.to(device), torch.tensor(q.x, device=device),
                                  [torch.tensor(o, device=device) for o in q.options])
    return {"prediction": options[int(losses.argmin())], "losses": dict(zip(options, losses.tolist()))}
