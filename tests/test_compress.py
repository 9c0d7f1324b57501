from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mendctl.evaluation import compress as compress_mod
from mendctl.evaluation.compress import compress
from mendctl.core.config import load_recipe
from mendctl.evaluation.scoring import demo_sets
from mendctl.training.trained import load_trained
from mendctl.core.registry import get_backend
from mendctl.models.render import context_ids

TINY = Path(__file__).resolve().parent.parent / "recipes" / "tiny"



def _llm_and_context(backend: str, tmp_path):
    recipe = load_recipe(TINY / f"{backend}.yaml", [f"output_dir={tmp_path}"])
    models, _ = load_trained(recipe, require=False)
    template = get_backend(recipe.backend).template(recipe)
    ds = demo_sets(recipe, template, models.llm_tokenizer)[0]
    return models, context_ids(template, ds.context, models.llm_tokenizer)


def _is_subsequence(small: list[int], big: list[int]) -> bool:
    it = iter(big)
    return all(t in it for t in small)


@pytest.mark.parametrize("backend", ["gpt2", "t5", "llama"])
def test_budget_order_and_determinism(backend, tmp_path, monkeypatch):
    # Small segments so that several are compressed, each conditioned on what the earlier ones kept.
    monkeypatch.setattr(compress_mod, "SEGMENT_TOKENS", 23)
    models, ids = _llm_and_context(backend, tmp_path)
    assert len(ids) > 3 * 23
    for budget in (1, 5, 16, len(ids) - 1):
        out = compress(models.llm, ids, budget, models.gated_mlp)
        assert len(out.ids) == budget
        assert _is_subsequence(out.ids, ids)
        assert out.flops > 0
        assert compress(models.llm, ids, budget, models.gated_mlp) == out
    short = compress(models.llm, ids[:3], 16)
    assert short.ids == ids[:3] and short.flops == 0


def test_keeps_the_most_surprising_tokens_under_the_llm(tmp_path):
    """One segment: the first token, then the K-1 tokens with the highest -log p under a plain full forward."""
    models, ids = _llm_and_context("llama", tmp_path)
    assert 9 < len(ids) <= compress_mod.SEGMENT_TOKENS
    out = compress(models.llm, ids, 9, models.gated_mlp)
    top = sorted(1 + int(i) for i in _info(models.llm, ids[:1], ids[1:]).topk(8).indices)
    assert out.ids == [ids[0]] + [ids[i] for i in top]


def _info(llm, context: list[int], tokens: list[int]) -> torch.Tensor:
    """-log p of `tokens` read after `context` (at least one token), from a plain full forward."""
    context = ([llm.bos_token_id] if llm.bos_token_id is not None else []) + context  # as the LLM reads it
    seq = torch.tensor([context + tokens])
    with torch.no_grad():
        logits = llm.model(input_ids=seq).logits[0, len(context) - 1:-1].float()
    return F.cross_entropy(logits, torch.tensor(tokens), reduction="none")


def test_later_segments_are_scored_after_the_kept_tokens_only(tmp_path, monkeypatch):
    monkeypatch.setattr(compress_mod, "SEGMENT_TOKENS", 30)
    models, ids = _llm_and_context("llama", tmp_path)
    ids = ids[:60]
    first, second = ids[:30], ids[30:]
    # Budget 10 over two equal segments: 5 each.
    top = sorted(1 + int(i) for i in _info(models.llm, first[:1], first[1:]).topk(4).indices)
    kept = [first[0]] + [first[i] for i in top]
    top = sorted(int(i) for i in _info(models.llm, kept, second).topk(5).indices)
    assert compress(models.llm, ids, 10, models.gated_mlp).ids == kept + [second[i] for i in top]
