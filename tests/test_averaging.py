"""`ema`: the moving average of the trained weights, what the saved distillers hold, and --resume."""
import io

import pytest
import torch
from accelerate.utils import load
from rich.console import Console
from safetensors.torch import load_file
from torch import nn

from mendctl.training.averaging import WeightAverage
from mendctl.training.resume import DamagedCheckpoint
from mendctl.commands.train import train

QUIET = Console(file=io.StringIO())


def test_the_average_follows_the_weights_with_a_warmed_up_decay_and_is_applied_only_inside_the_block():
    model = nn.Linear(2, 1, bias=False)
    model.weight.data.fill_(0.0)
    avg = WeightAverage(model, decay=0.9)
    model.weight.data.fill_(1.0)
    avg.update()  # n = 0: d = min(0.9, 1/10) = 0.1
    torch.testing.assert_close(avg.shadow["weight"], torch.full((1, 2), 0.9))
    model.weight.data.fill_(2.0)
    avg.update()  # n = 1: d = 2/11
    torch.testing.assert_close(avg.shadow["weight"], torch.full((1, 2), 2 / 11 * 0.9 + 9 / 11 * 2.0))
    with avg.applied():
        assert torch.equal(model.weight.data, avg.shadow["weight"])
    assert torch.equal(model.weight.data, torch.full((1, 2), 2.0))
    for _ in range(200):
        avg.update()
    assert avg.updates == 202 and min(0.9, 202 / 211) == 0.9  # the decay has reached `ema`
    other = WeightAverage(model, decay=0.9)
    other.load_state_dict(avg.state_dict())
    assert other.updates == 202 and torch.equal(other.shadow["weight"], avg.shadow["weight"])


def test_the_final_distiller_holds_the_average_and_the_checkpoint_the_raw_weights(tiny):
    recipe = tiny("gpt2", "finetune.steps=6", "finetune.save_every=6", "finetune.ema=0.8", "finetune.lr=1e-2")
    train(recipe, "finetune", console=QUIET)
    out = recipe.output_dir / "finetune"
    final = load_file(out / "distiller.safetensors")
    raw = load_file(out / "checkpoints" / "step_0000006" / "model.safetensors")
    shadow = load(out / "checkpoints" / "step_0000006" / "custom_checkpoint_0.pkl", map_location="cpu")["shadow"]
    assert final.keys() == raw.keys() == shadow.keys()
    assert all(torch.equal(final[k], shadow[k]) for k in final)
    assert any(not torch.equal(final[k], raw[k]) for k in final)


def test_a_checkpoint_without_the_average_does_not_resume_with_ema(tiny):
    recipe = tiny("gpt2", "finetune.steps=4", "finetune.save_every=2")
    train(recipe, "finetune", console=QUIET)
    with pytest.raises(DamagedCheckpoint, match="holds no weight average"):
        train(tiny("gpt2", "finetune.steps=6", "finetune.save_every=2", "finetune.ema=0.9"), "finetune", resume=True,
              console=QUIET)
