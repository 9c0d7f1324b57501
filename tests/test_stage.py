"""A stage is built once from the recipe: what differs between pretrain and finetune is decided there."""
import pytest

from mendctl.training.checkpoint import WEIGHTS
from mendctl.training.stage import build_stage


def test_the_stages_differ_in_loss_weights_ce_and_output(tiny):
    recipe = tiny("gpt2", "finetune.ce_weight=0.5", "finetune.kl_weight=2")
    pre, fine = build_stage(recipe, "pretrain"), build_stage(recipe, "finetune")
    assert (pre.ce_weight, pre.kl_weight, pre.measures_ce) == (0.0, 1.0, False)
    assert (fine.ce_weight, fine.kl_weight, fine.measures_ce) == (0.5, 2.0, True)
    assert pre.spec is recipe.pretrain and fine.spec is recipe.finetune
    assert fine.checkpoints == recipe.output_dir / "finetune" / "checkpoints"


def test_finetune_starts_from_stage_1_when_its_output_is_there(tiny, tmp_path):
    recipe = tiny("gpt2")
    assert build_stage(recipe, "finetune").start_from is None
    (recipe.stage_dir("pretrain")).mkdir(parents=True)
    (recipe.stage_dir("pretrain") / WEIGHTS).write_bytes(b"")
    assert build_stage(recipe, "finetune").start_from == recipe.stage_dir("pretrain")
    assert build_stage(recipe, "pretrain").start_from is None  # stage 1 always starts from the initial distiller
    explicit = tmp_path / "elsewhere.safetensors"
    explicit.write_bytes(b"")
    assert build_stage(tiny("gpt2", f"finetune.init_from={explicit}"), "finetune").start_from == explicit


def test_a_stage_the_recipe_lacks_or_that_does_not_exist_is_refused(tiny):
    with pytest.raises(ValueError, match="the recipe has no `finetune` section"):
        build_stage(tiny("gpt2", "finetune=null"), "finetune")
    with pytest.raises(ValueError, match="no training stage 'distill'"):
        build_stage(tiny("gpt2"), "distill")
