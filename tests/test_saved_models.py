"""gpt2 and t5 loaded by path, through the same code as a hub id: tiny models saved with save_pretrained
(tests/saved_models.py) with their tokenizers' special tokens and GPT-2's 1,024 positions, trained in bf16
mixed precision on CPU, then distilled and evaluated."""
import json

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoTokenizer, GPT2LMHeadModel, T5ForConditionalGeneration

from mendctl.cli import cli
from mendctl.core.config import load_recipe
from mendctl.core.positions import recipe_problems
from mendctl.core.registry import get_backend

from saved_models import EOT, GPT2_POSITIONS, ROOT, SAVERS, T5_SENTINELS, T5_SPECIALS

SIZES = {"llm": dict(layers=2, hidden=64, heads=2, seed=0), "distiller": dict(layers=2, hidden=32, heads=2, seed=1)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """saved(backend) -> (llm folder, distiller folder), each made once per module."""
    made = {}

    def make(backend):
        if backend not in made:
            root = tmp_path_factory.mktemp(f"saved-{backend}")
            made[backend] = tuple(SAVERS[backend](root / role, **SIZES[role]) for role in ("llm", "distiller"))
        return made[backend]

    return make


def sources(saved, backend):
    llm, distiller = saved(backend)
    return ["llm.random_init=null", f"llm.source={llm}", "distiller.random_init=null", f"distiller.source={distiller}"]


def recipe_for(saved, backend, tmp_path, *overrides):
    return load_recipe(ROOT / "recipes" / "tiny" / f"{backend}.yaml",
                       [f"output_dir={tmp_path / 'run'}", *sources(saved, backend), *overrides])


def test_gpt2_loads_its_tokenizer_special_tokens_positions_and_weights(saved, tmp_path):
    llm_dir, distiller_dir = saved("gpt2")
    assert AutoTokenizer.from_pretrained(llm_dir).pad_token is None  # as the hub's gpt2: no pad token
    models = get_backend("gpt2").build(recipe_for(saved, "gpt2", tmp_path))
    tok = models.llm_tokenizer
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (EOT, EOT, EOT)  # pads (always masked) are eos
    assert models.llm.pad_token_id == tok.eos_token_id and models.llm.bos_token_id is None  # no BOS for gpt2
    assert models.llm.max_positions == GPT2_POSITIONS
    assert tok(" the cat", add_special_tokens=False).input_ids == models.distiller_tokenizer(" the cat").input_ids
    # The distiller is read as GPT2Model from a GPT2LMHeadModel checkpoint: its weights, not a random init.
    saved_body = GPT2LMHeadModel.from_pretrained(distiller_dir).transformer
    torch.testing.assert_close(models.distiller.body.wte.weight, saved_body.wte.weight)
    torch.testing.assert_close(models.distiller.body.h[1].mlp.c_fc.weight, saved_body.h[1].mlp.c_fc.weight)


def test_t5_loads_its_tokenizer_special_tokens_sentinels_and_encoder_weights(saved, tmp_path):
    llm_dir, distiller_dir = saved("t5")
    models = get_backend("t5").build(recipe_for(saved, "t5", tmp_path))
    tok = models.llm_tokenizer
    assert [tok.convert_ids_to_tokens(i) for i in (0, 1, 2)] == T5_SPECIALS
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    sentinels = [f"<extra_id_{i}>" for i in range(T5_SENTINELS)]
    assert all(len(tok(s, add_special_tokens=False).input_ids) == 1 for s in sentinels)  # each one token
    assert len(tok) < models.llm.model.config.vocab_size  # the table is padded past the tokenizer, as t5's are
    config = models.llm.model.config
    assert config.decoder_start_token_id == models.llm.pad_token_id == 0 and models.llm.max_positions is None
    assert tok("a b").input_ids[-1] == 1 and tok("a b", add_special_tokens=False).input_ids[-1] != 1  # mendctl adds no eos
    saved_encoder = T5ForConditionalGeneration.from_pretrained(distiller_dir).encoder
    assert type(models.distiller.body).__name__ == "T5EncoderModel"
    torch.testing.assert_close(models.distiller.body.shared.weight, saved_encoder.embed_tokens.weight)
    torch.testing.assert_close(models.distiller.body.encoder.block[1].layer[1].DenseReluDense.wi_0.weight,
                               saved_encoder.block[1].layer[1].DenseReluDense.wi_0.weight)


def test_gpt2s_1024_positions_bound_the_recipe_before_any_model_loads(saved, tmp_path):
    keys = lambda *o: {k for k, _ in recipe_problems(recipe_for(saved, "gpt2", tmp_path, *o))}  # noqa: E731
    assert keys() == set()
    assert keys("distiller.max_length=1021") == {"distiller.max_length"}  # + 4 placeholders > 1024
    assert keys("template.max_context_tokens=1000") == {"template.max_context_tokens"}
    assert keys("pretrain.max_length=1025") == {"pretrain.max_length"}
    assert keys("pretrain.max_length=1024") == set()


@pytest.fixture
def fresh_accelerate():
    """Accelerate keeps one state per process: a run without mixed precision before this one would refuse
    bf16, and this one's bf16 would be refused by the next (each mendctl command runs in its own process)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@pytest.mark.parametrize("backend", ["gpt2", "t5"])
def test_saved_models_train_in_bf16_then_distill_and_eval(saved, backend, tmp_path, monkeypatch, fresh_accelerate):
    import mendctl.commands.train as trainer

    autocast = []
    real = trainer.step_loss

    def watched(*args, **kwargs):
        autocast.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "step_loss", watched)
    recipe = f"recipes/tiny/{backend}.yaml"
    # 1,024-token passages: GPT-2's teacher reads every one of its positions.
    common = [f"output_dir={tmp_path / 'run'}", *sources(saved, backend), "pretrain.max_length=1024",
              "eval.methods=[zero-shot, icl, mend]"]
    for stage in ("pretrain", "finetune"):
        result = CliRunner().invoke(cli, [stage, recipe, *common, f"{stage}.steps=2", f"{stage}.save_every=2",
                                          f"{stage}.mixed_precision=bf16", f"{stage}.batch_size=2"])
        assert result.exit_code == 0, result.output
        lines = (tmp_path / "run" / stage / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in lines] == [1, 2]
        assert all(torch.isfinite(torch.tensor(json.loads(line)["loss"])) for line in lines)
    assert autocast == [(True, torch.bfloat16)] * 4
    for args in (["distill", recipe, *common], ["eval", recipe, *common, "--limit", "2"]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())
    assert set(results["aggregate"]) == {"zero-shot", "icl", "mend"}
    assert results["device"] == "cpu"
