"""Inputs longer than a model's positions are cut from the left (MetaICL), never an index error;
T5 scores as its own forward does, with and without the original T5's decoder-output scaling."""
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model, T5Config, T5ForConditionalGeneration

from mendctl.backends.t5 import T5LM
from mendctl.models.distiller import Distiller
from mendctl.models.lm import CausalLM
from mendctl.core.positions import max_positions


def _gpt2(positions: int) -> CausalLM:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50, n_positions=positions, n_embd=16, n_layer=1, n_head=2)
    return CausalLM(GPT2LMHeadModel(config), pad_token_id=0)


def test_target_logits_past_the_last_position_drop_the_oldest_prefix_rows():
    lm = _gpt2(16)
    prefix, x, y = torch.randn(10, 16), torch.arange(1, 6), torch.arange(6, 10)  # 19 > 16 positions
    cut = lm.target_logits([prefix], [x], [y])
    same = lm.target_logits([prefix[3:]], [x], [y])
    torch.testing.assert_close(cut.logits, same.logits)
    assert cut.targets.tolist() == same.targets.tolist() == [*range(1, 10)]


def test_option_scores_past_the_last_position_keep_the_newest_context():
    lm = _gpt2(16)
    prefix, x = torch.randn(20, 16), torch.arange(1, 4)
    options = [torch.tensor([5, 6, 7]), torch.tensor([8])]
    with torch.no_grad():
        cut = lm.option_losses(prefix, x, options)
        same = lm.option_losses(prefix[-10:], x, options)  # 16 positions - 3 option tokens - 3 query tokens
    torch.testing.assert_close(cut, same)


def test_distiller_keeps_the_newest_demonstration_tokens():
    torch.manual_seed(0)
    body = GPT2Model(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    distiller = Distiller(body, d_llm=16, num_vectors=4).eval()
    assert distiller.max_input == 12
    ids = torch.randint(1, 50, (1, 30))
    with torch.no_grad():
        torch.testing.assert_close(distiller(ids, torch.ones_like(ids)), distiller(ids[:, -12:], torch.ones_like(ids[:, -12:])))
    with pytest.raises(ValueError, match="no room for demonstrations"):
        Distiller(body, d_llm=16, num_vectors=16)


def test_relative_positions_have_no_limit():
    assert max_positions(T5Config()) is None
    assert max_positions(GPT2Config(n_positions=1024)) == 1024


@pytest.mark.parametrize("tied", [True, False])
def test_t5_scores_equal_its_own_forward(tied):
    torch.manual_seed(0)
    config = T5Config(vocab_size=40, d_model=64, d_kv=16, d_ff=64, num_layers=1, num_heads=4, pad_token_id=0,
                      decoder_start_token_id=0, tie_word_embeddings=tied)
    model = T5ForConditionalGeneration(config).eval()
    lm = T5LM(model, pad_token_id=0)
    x, y = torch.tensor([5, 6, 7, 8]), torch.tensor([9, 10, 11])
    with torch.no_grad():
        ours = lm.target_logits([lm.embed(x[:0])], [x], [y]).logits
        theirs = model(input_ids=x[None], labels=y[None]).logits[0]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_a_run_past_the_models_positions_is_cut_not_crashed(tiny, monkeypatch):
    """GPT-2 with 64 positions against contexts of hundreds of tokens: train and eval still run
    (validate would refuse this recipe; the run-time cut is what protects hub models it cannot see)."""
    from rich.console import Console

    from mendctl.backends.gpt2 import Backend
    from mendctl.commands.eval import run_eval
    from mendctl.commands.train import train

    original = Backend.tiny_config

    def short(self, spec, tokenizer, *, encoder_only=False):
        config = original(self, spec, tokenizer, encoder_only=encoder_only)
        config.n_positions = 64
        return config

    monkeypatch.setattr(Backend, "tiny_config", short)
    recipe = tiny("gpt2", "finetune.steps=1", "finetune.batch_size=2", "tasks.seeds=[100]")
    quiet = Console(quiet=True)
    train(recipe, "finetune", console=quiet)
    results = run_eval(recipe, limit=2, console=quiet)
    assert set(results["aggregate"]) == {"zero-shot", "icl", "icl-truncated", "llmlingua", "mend"}
