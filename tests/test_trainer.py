"""Both training stages on the tiny recipes: outputs, learning, a frozen LLM, resume, bad data, NaN."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from rich.console import Console
from safetensors.torch import load_file

import mendctl.models.backend
from mendctl.cli import cli
from mendctl.core.registry import get_backend
from mendctl.commands.train import TrainingDiverged, train

BACKENDS = ("gpt2", "t5", "llama")
QUIET = Console(quiet=True)


def metrics(out: Path, stage: str) -> list[dict]:
    return [json.loads(line) for line in (out / stage / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("backend", BACKENDS)
def test_both_stages_run_from_the_cli_and_write_their_outputs(backend, tmp_path):
    out = tmp_path / backend
    common = [f"recipes/tiny/{backend}.yaml", f"output_dir={out}"]
    for stage in ("pretrain", "finetune"):
        result = CliRunner().invoke(cli, [stage, *common, f"{stage}.steps=4", f"{stage}.save_every=2"])
        assert result.exit_code == 0, result.output
        d = out / stage
        assert (d / "distiller.safetensors").is_file()
        assert sorted(p.name for p in (d / "checkpoints").iterdir()) == ["step_0000002", "step_0000004"]
        run = json.loads((d / "run.json").read_text())
        assert run["recipe"]["backend"] == backend and run["stage"] == stage and run["steps"] == 4
        assert "torch" in run["versions"] and "git" in run
        assert json.loads((d / "distiller.json").read_text())["num_vectors"] == 4
        assert [m["step"] for m in metrics(out, stage)] == [1, 2, 3, 4]
    assert "Starting from" in result.output  # finetune picked up the stage-1 distiller
    assert json.loads((out / "finetune" / "run.json").read_text())["initialised_from"] == str(out / "pretrain")
    assert all(m["ce"] > 0 and m["teacher_ce"] > 0 for m in metrics(out, "finetune"))
    # Stage 1 trains on the KL alone and measures no CE (its targets are plain text, not labels).
    assert all(m["loss"] == pytest.approx(m["kl"]) and m["ce"] == 0 and m["teacher_ce"] == 0
               for m in metrics(out, "pretrain"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_falls_on_a_tiny_overfit_set_and_llm_stays_bit_identical(backend, tiny, tmp_path, monkeypatch):
    doc = tmp_path / "doc.txt"
    doc.write_text((Path("data/tiny/text/moby_dick_excerpt.txt").read_text())[:600])
    recipe = tiny(backend, "pretrain.steps=60", "pretrain.lr=1e-2", f"pretrain.text=[{doc}]", "num_vectors=16")
    built = []
    real_build = mendctl.models.backend.Backend.build

    def spy(self, r):
        built.append(real_build(self, r))
        return built[-1]

    monkeypatch.setattr(mendctl.models.backend.Backend, "build", spy)
    train(recipe, "pretrain", console=QUIET)
    fresh = real_build(get_backend(backend), recipe)
    for k, v in fresh.llm.model.state_dict().items():
        assert torch.equal(v, built[0].llm.model.state_dict()[k]), k
    kl = [m["kl"] for m in metrics(recipe.output_dir, "pretrain")]
    assert sum(kl[-5:]) / 5 < 0.6 * kl[0], kl


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_lr_warms_up_then_decays_to_zero_by_the_chosen_schedule(schedule, tiny):
    import math

    recipe = tiny("gpt2", "pretrain.steps=6", "pretrain.warmup_steps=2", "pretrain.lr=1e-3",
                  f"pretrain.lr_schedule={schedule}")
    train(recipe, "pretrain", console=QUIET)
    # A record holds the lr of the step after it: the schedule's value after `step` scheduler steps.
    decay = {"linear": lambda t: 1 - t, "cosine": lambda t: 0.5 * (1 + math.cos(math.pi * t))}[schedule]
    expected = [1e-3 * (s / 2 if s < 2 else decay((s - 2) / 4)) for s in range(1, 7)]
    assert [m["lr"] for m in metrics(recipe.output_dir, "pretrain")] == pytest.approx(expected, abs=1e-12)


# gpt2 computes its teacher every step; llama reads it from the cache and trains LoRA adapters (dropout on, so
# the RNG matters) on the LLM's own shared layers, its checkpoints holding only the adapters.
@pytest.mark.parametrize("recipe,extra", [("gpt2", ["finetune.teacher_cache=false"]),
                                          ("llama", ["finetune.teacher_cache=true", "distiller.lora={r: 4, dropout: 0.1}"])])
def test_resume_after_sigkill_gives_the_same_final_weights(recipe, extra, tmp_path):
    args = [f"recipes/tiny/{recipe}.yaml", "finetune.steps=24", "finetune.save_every=3", *extra]
    cmd = [sys.executable, "-m", "mendctl", "finetune"]
    # The killed run computes its teacher (cache b); the resumed one reads the teacher run a computed (cache a):
    # bit-exact even so, as a cached teacher gives the same loss as a computed one.
    env = lambda name: {**os.environ, "MENDCTL_CACHE": str(tmp_path / f"cache-{name}")}  # noqa: E731
    subprocess.run(cmd + args + [f"output_dir={tmp_path / 'a'}"], check=True, capture_output=True, env=env("a"))
    b = tmp_path / "b"
    proc = subprocess.Popen(cmd + args + [f"output_dir={b}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env("b"))
    deadline = time.time() + 120
    while not (b / "finetune" / "checkpoints" / "step_0000006").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (b / "finetune" / "distiller.safetensors").exists(), "killed too late to test anything"
    assert ("finetune.teacher_cache=true" in extra) == (tmp_path / "cache-b" / "teacher").is_dir()
    resumed = subprocess.run(cmd + args + [f"output_dir={b}", "--resume"], capture_output=True, text=True, env=env("a"))
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming from" in resumed.stdout
    wa = load_file(tmp_path / "a" / "finetune" / "distiller.safetensors")
    wb = load_file(b / "finetune" / "distiller.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert [m["step"] for m in metrics(b, "finetune")] == list(range(1, 25))


def test_malformed_jsonl_line_fails_with_file_and_line(tmp_path):
    data = tmp_path / "tasks"
    for task in ("tiny_parity", "tiny_color", "tiny_sound", "tiny_length", "tiny_sentiment", "tiny_compare"):
        src = Path("data/tiny/tasks") / task
        (data / task).mkdir(parents=True)
        for f in src.iterdir():
            (data / task / f.name).write_text(f.read_text())
    bad = data / "tiny_color" / "tiny_color_16384_100_train.jsonl"
    lines = bad.read_text().splitlines()
    lines[6] = '{"input": "sky", "output": '
    bad.write_text("\n".join(lines) + "\n")
    result = CliRunner().invoke(cli, ["finetune", "recipes/tiny/gpt2.yaml", f"output_dir={tmp_path / 'o'}",
                                      f"tasks.data_dir={data}", "finetune.steps=2"])
    assert result.exit_code == 2
    assert f"{bad}:7: malformed JSON" in result.output
    assert "Traceback" not in result.output


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny, monkeypatch):
    import mendctl.commands.train as trainer

    recipe = tiny("gpt2", "pretrain.steps=10", "pretrain.save_every=2")
    real = trainer.step_loss
    calls = []

    def poisoned(*args, **kwargs):
        stats = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 5:
            stats.loss = stats.loss * float("nan")
        return stats

    monkeypatch.setattr(trainer, "step_loss", poisoned)
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 5; the last good checkpoint is .*step_0000004"):
        train(recipe, "pretrain", console=QUIET)
    ckpts = sorted(p.name for p in (recipe.output_dir / "pretrain" / "checkpoints").iterdir())
    assert ckpts == ["step_0000002", "step_0000004"]
    assert not (recipe.output_dir / "pretrain" / "distiller.safetensors").exists()


def test_accelerate_launch_runs_two_processes_on_cpu(tmp_path):
    launcher = Path(sys.executable).parent / "accelerate"
    out = tmp_path / "mp"
    result = subprocess.run([str(launcher), "launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
                             "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "mendctl", "finetune",
                             "recipes/tiny/gpt2.yaml", f"output_dir={out}", "finetune.steps=2", "finetune.save_every=2"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "finetune" / "distiller.safetensors").is_file()
    assert [m["step"] for m in metrics(out, "finetune")] == [1, 2]  # written once, by the main process


def test_streamed_dataset_is_read_in_order_and_skipped_on_resume(monkeypatch, tiny):
    import mendctl.training.examples as examples

    opened = []

    def fake_stream(dataset_id, split, config):
        opened.append((dataset_id, split, config))
        return iter([f"document number {i} " * 5 for i in range(100)])

    monkeypatch.setattr(examples, "iter_hf", fake_stream)
    recipe = tiny("gpt2", "pretrain.text=null", "pretrain.hf_dataset=allenai/c4", "pretrain.hf_config=en")
    tok = get_backend("gpt2").build(recipe).llm_tokenizer
    source = examples.TextExamples(recipe.pretrain, tok, 0, False)
    first = [source.get(p) for p in range(3)]
    assert tok.decode(first[2].ctx).startswith("document number 2")
    resumed = examples.TextExamples(recipe.pretrain, tok, 0, False)
    assert resumed.get(2) == first[2]  # a fresh stream skips what the first run consumed
    assert opened == [("allenai/c4", "train", "en")] * 2


@pytest.mark.parametrize("extra", [(), ("finetune.ema=0.9",)])  # with ema, the average resumes too
def test_ctrl_c_saves_the_last_finished_step_and_resume_matches(tiny, monkeypatch, extra):
    import mendctl.commands.train as trainer

    overrides = ("finetune.steps=8", "finetune.save_every=3", *extra)
    straight = tiny("gpt2", *overrides)
    train(straight, "finetune", console=QUIET)
    recipe = tiny("gpt2", *overrides, f"output_dir={straight.output_dir}-interrupted")
    real, calls = trainer.step_loss, []

    def interrupted(*args, **kwargs):
        stats = real(*args, **kwargs)  # step 5's forward has drawn its dropout masks from the RNG
        calls.append(1)
        if len(calls) == 5:  # during step 5: steps 1-4 are done, the last regular checkpoint is step 3
            raise KeyboardInterrupt
        return stats

    monkeypatch.setattr(trainer, "step_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(recipe, "finetune", console=QUIET)
    ckpts = recipe.output_dir / "finetune" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_0000003", "step_0000004"]
    monkeypatch.setattr(trainer, "step_loss", real)
    train(recipe, "finetune", resume=True, console=QUIET)
    a = load_file(straight.output_dir / "finetune" / "distiller.safetensors")
    b = load_file(recipe.output_dir / "finetune" / "distiller.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


# Accelerate itself warns that tensorboard is missing: the availability check is faked here.
@pytest.mark.filterwarnings("ignore:`log_with=")
def test_trackers_reach_accelerate_when_installed_and_warn_when_not(tiny, monkeypatch):
    import accelerate.utils

    import mendctl.commands.train as trainer

    recipe = tiny("gpt2", "pretrain.steps=2", "pretrain.trackers=[tensorboard,wandb]")
    logged = []
    monkeypatch.setattr(accelerate.utils, "is_tensorboard_available", lambda: True)
    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)
    monkeypatch.setattr(trainer.Accelerator, "init_trackers", lambda self, name, config=None: logged.append(name))
    monkeypatch.setattr(trainer.Accelerator, "log", lambda self, values, step=None: logged.append(step))
    monkeypatch.setattr(trainer.Accelerator, "end_training", lambda self: logged.append("end"))
    console = Console(record=True, width=200)
    train(recipe, "pretrain", console=console)
    assert logged == ["mendctl-pretrain", 1, 2, "end"]
    assert "tracker wandb is not installed" in console.export_text()


def test_a_second_run_refuses_to_mix_with_earlier_checkpoints_unless_told(tmp_path):
    args = ["pretrain", "recipes/tiny/gpt2.yaml", f"output_dir={tmp_path}", "pretrain.steps=4", "pretrain.save_every=2"]
    assert CliRunner().invoke(cli, args).exit_code == 0
    again = CliRunner().invoke(cli, [*args[:3], "pretrain.steps=2", "pretrain.save_every=1"])
    assert again.exit_code == 2 and "continue it with --resume, or start over with --restart" in again.output
    restarted = CliRunner().invoke(cli, [*args[:3], "pretrain.steps=2", "pretrain.save_every=1", "--restart"])
    assert restarted.exit_code == 0, restarted.output
    ckpts = sorted(p.name for p in (tmp_path / "pretrain" / "checkpoints").iterdir())
    assert ckpts == ["step_0000001", "step_0000002"]  # the earlier run's step 4 is gone, not resumable by mistake
    assert CliRunner().invoke(cli, [*args, "--resume", "--restart"]).exit_code == 2
