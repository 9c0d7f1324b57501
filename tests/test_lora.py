"""What of the distiller trains: LoRA adapters on shared LLM layers, frozen embeddings, and what is saved."""
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import mendctl.models.backend
from mendctl.training.checkpoint import load_distiller
from mendctl.core.config import RecipeError, load_recipe
from mendctl.models.distiller import distill
from mendctl.core.registry import get_backend
from mendctl.commands.train import train

QUIET = Console(quiet=True)
LORA = "distiller.lora={r: 4, alpha: 8, dropout: 0.1}"
SHARED = ("distiller.random_init=null", "distiller.init_from_llm_layers=1")  # gpt2 and t5 tiny have their own body
CONTEXTS = ["red apple\nblue sky\n", "one two three four five six"]


@pytest.fixture
def spy_build(monkeypatch):
    """The Models each build returns, in order: the trainer's are trained in place."""
    built, real = [], mendctl.models.backend.Backend.build

    def spy(self, recipe):
        built.append(real(self, recipe))
        return built[-1]

    monkeypatch.setattr(mendctl.models.backend.Backend, "build", spy)
    return built


def build(recipe):
    return get_backend(recipe.backend).build(recipe)


def trainable(module) -> set[str]:
    return {n for n, p in module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("backend,body", [("llama", ()), ("gpt2", SHARED), ("t5", SHARED), ("t5", ())])
def test_lora_distiller_learns_while_the_llm_stays_bit_identical(backend, body, tiny, spy_build):
    recipe = tiny(backend, *body, LORA, "pretrain.steps=6", "pretrain.lr=1e-2")
    train(recipe, "pretrain", console=QUIET)
    trained, fresh = spy_build[0], build(recipe)
    for k, v in fresh.llm.model.state_dict().items():
        assert torch.equal(v, trained.llm.model.state_dict()[k]), k
    assert not any("lora_" in n for n, _ in trained.llm.named_parameters())  # the LLM's own modules are unwrapped
    names = trainable(trained.distiller)
    assert names and all("lora_" in n or not n.startswith("body.") for n in names)
    before = dict(fresh.distiller.named_parameters())
    changed = [n for n, p in trained.distiller.named_parameters() if not torch.equal(p, before[n])]
    assert changed and set(changed) <= names  # only trainable tensors moved, and some did
    assert any("lora_B" in n for n in changed)  # B starts at zero: the adapters now contribute
    assert not torch.equal(distill(trained, CONTEXTS, 64, 2)[0], distill(fresh, CONTEXTS, 64, 2)[0])


@pytest.mark.parametrize("backend", ["llama", "gpt2", "t5"])
def test_shared_layers_are_the_llms_own_tensors(backend, tiny):
    models = build(tiny(backend, *(() if backend == "llama" else SHARED), LORA))
    llm = {p.data_ptr() for p in models.llm.model.parameters()}
    base = [(n, p) for n, p in models.distiller.body.named_parameters() if "lora_" not in n]
    assert base and all(p.data_ptr() in llm and not p.requires_grad for _, p in base), \
        [n for n, p in base if p.data_ptr() not in llm]
    assert not {id(m) for m in models.distiller.body.modules()} & {id(m) for m in models.llm.modules()}
    copied = build(tiny(backend, *(() if backend == "llama" else SHARED)))  # without LoRA: an independent copy
    assert not {p.data_ptr() for p in copied.distiller.body.parameters()} & {p.data_ptr() for p in copied.llm.parameters()}


def test_saved_distiller_and_checkpoints_hold_only_trainable_tensors_and_reload_to_the_same_vectors(tiny, spy_build):
    recipe = tiny("llama", LORA, "pretrain.steps=2", "pretrain.save_every=2", "pretrain.lr=1e-2")
    path = train(recipe, "pretrain", console=QUIET)
    trained = spy_build[0]
    saved = load_file(path)
    assert set(saved) == trainable(trained.distiller)
    assert "placeholders" in saved and not any("base_layer" in k or "embed" in k for k in saved)
    with safe_open(path, "pt") as f:  # the file explains itself: its recipe and provenance ride along
        meta = f.metadata()
    assert json.loads(meta["recipe"])["distiller"]["lora"]["r"] == recipe.distiller.lora.r
    assert json.loads(meta["provenance"])["steps"] == 2
    ckpt = load_file(recipe.output_dir / "pretrain" / "checkpoints" / "step_0000002" / "model.safetensors")
    assert set(ckpt) == set(saved)
    reloaded = build(recipe)
    load_distiller(reloaded.distiller, recipe.stage_dir("pretrain"))
    for a, b in zip(distill(trained, CONTEXTS, 64, 2), distill(reloaded, CONTEXTS, 64, 2)):
        assert torch.equal(a, b)


def test_a_distiller_file_that_does_not_fit_is_refused_with_its_name(tiny, tmp_path):
    lora, full = build(tiny("llama", LORA)), build(tiny("llama"))
    full_file = tmp_path / "full.safetensors"
    save_file({n: p.detach().contiguous() for n, p in full.distiller.named_parameters()}, str(full_file))
    with pytest.raises(ValueError, match=rf"{full_file} does not fit .*missing \['body.layers.0.*unexpected \['body"):
        load_distiller(lora.distiller, full_file)
    partial = tmp_path / "partial.safetensors"
    save_file({"placeholders": lora.distiller.placeholders.detach()}, str(partial))
    with pytest.raises(ValueError, match=rf"{partial} does not fit .*missing \['body.layers.0.mlp.down_proj.lora_A"):
        load_distiller(lora.distiller, partial)


@pytest.mark.parametrize("backend", ["llama", "gpt2"])
def test_frozen_embeddings_stay_as_loaded_while_the_rest_of_the_body_trains(backend, tiny, spy_build):
    recipe = tiny(backend, "distiller.freeze_embeddings=true", "pretrain.steps=1", "pretrain.lr=1e-2")
    path = train(recipe, "pretrain", console=QUIET)
    trained, fresh = spy_build[0].distiller.body, build(recipe).distiller.body
    assert torch.equal(trained.get_input_embeddings().weight, fresh.get_input_embeddings().weight)
    assert not trained.get_input_embeddings().weight.requires_grad
    moved = [n for (n, p), q in zip(trained.named_parameters(), fresh.parameters()) if not torch.equal(p, q)]
    assert moved  # the layers still train
    embedding = next(n for n, p in trained.named_parameters() if p is trained.get_input_embeddings().weight)
    assert f"body.{embedding}" not in load_file(path) and f"body.{moved[0]}" in load_file(path)


def test_lora_keys_are_validated(tmp_path):
    recipe = Path("recipes/tiny/llama.yaml")
    with pytest.raises(RecipeError, match=r"distiller.lora.r: Input should be greater than or equal to 1"):
        load_recipe(recipe, [f"output_dir={tmp_path}", "distiller.lora={r: 0}"])
    with pytest.raises(RecipeError, match=r"distiller.lora.target_modules"):
        load_recipe(recipe, [f"output_dir={tmp_path}", "distiller.lora={target_modules: []}"])
    with pytest.raises(RecipeError, match=r"distiller.dtype \(bfloat16\) must equal llm.dtype \(float32\)"):
        load_recipe(recipe, [f"output_dir={tmp_path}", "distiller.lora={}", "distiller.dtype=bfloat16"])
    # With a body of its own, the distiller may keep another dtype.
    load_recipe("recipes/tiny/gpt2.yaml", [f"output_dir={tmp_path}", "distiller.lora={}", "distiller.dtype=bfloat16"])


def test_export_writes_a_checkpoint_as_a_distiller_file_that_distils_like_it(tiny, tmp_path):
    from click.testing import CliRunner

    from mendctl.cli import cli

    recipe = tiny("llama", LORA, "pretrain.steps=4", "pretrain.save_every=2", "pretrain.keep_last=2", "pretrain.lr=1e-2")
    train(recipe, "pretrain", console=QUIET)
    step2 = recipe.output_dir / "pretrain" / "checkpoints" / "step_0000002"
    dest = tmp_path / "shipped" / "d.safetensors"
    args = ["export", "recipes/tiny/llama.yaml", str(step2), str(dest), LORA, f"output_dir={recipe.output_dir}"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    with safe_open(dest, "pt") as f:
        assert json.loads(f.metadata()["provenance"])["steps"] == 2
    at2, at4 = build(recipe), build(recipe)
    load_distiller(at2.distiller, dest)
    load_distiller(at4.distiller, recipe.stage_dir("pretrain"))
    # The exported step, not the last one: its vectors are step 2's, which differ from step 4's.
    ckpt = build(recipe)
    ckpt.distiller.load_state_dict(load_file(step2 / "model.safetensors"), strict=False)
    assert torch.equal(distill(at2, CONTEXTS, 64, 2)[0], distill(ckpt, CONTEXTS, 64, 2)[0])
    assert not torch.equal(distill(at2, CONTEXTS, 64, 2)[0], distill(at4, CONTEXTS, 64, 2)[0])
    other = CliRunner().invoke(cli, ["export", "recipes/tiny/llama.yaml", str(step2), str(tmp_path / "x.safetensors"),
                                     f"output_dir={recipe.output_dir}"])  # without LoRA: another distiller
    assert other.exit_code == 2 and "does not fit this recipe's distiller" in other.output
