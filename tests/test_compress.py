import io
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mendctl import compress as compress_mod
from mendctl.compress import compress
from mendctl.config import load_recipe
from mendctl.distill import demo_sets, load_trained
from mendctl.registry import get_backend
from mendctl.render import context_ids

TINY = Path(__file__).resolve().parent.parent / "recipes" / "tiny"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
    with torch.no_grad():
        logits = models.llm.model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    info = F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")
    top = sorted(1 + int(i) for i in info.topk(8).indices)
    assert out.ids == [ids[0]] + [ids[i] for i in top]
