"""Learning curves: validation tasks held out of stage 2 and scored every eval_every steps."""
import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from mendctl.core.config import RecipeError
from mendctl.training.examples import TaskExamples, meta_train_tasks
from mendctl.core.registry import get_backend
from mendctl.commands.train import train
from mendctl.data.workspace import data_dir, partition_for

QUIET = Console(quiet=True)
VAL_KEYS = {"val_mend_f1", "val_agreement", "val_kl", "val_icl_f1", "val_zero_shot_f1", "val_zero_shot_agreement",
            "val_zero_shot_kl"}



def _records(recipe, stage: str = "finetune") -> list[dict]:
    path = recipe.output_dir / stage / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _curve(recipe) -> list[dict]:
    return [r for r in _records(recipe) if "val_mend_f1" in r]


CURVES = ("tasks.validation=[tiny_color, tiny_sound]", "finetune.eval_every=2", "finetune.eval_queries=4")


def test_curves_are_logged_every_eval_every_steps_and_plotted(tiny):
    recipe = tiny("gpt2", *CURVES, "finetune.steps=5", "finetune.save_every=5")
    train(recipe, "finetune", console=QUIET)
    curve = _curve(recipe)
    # Step 0 is the untrained distiller; then every 2 steps, and the last step.
    assert [r["step"] for r in curve] == [0, 2, 4, 5]
    assert set(curve[0]) == {"step"} | VAL_KEYS
    assert all(VAL_KEYS | {"loss", "kl", "ce"} <= set(r) for r in curve[1:])
    assert [r["step"] for r in _records(recipe) if "loss" in r] == [1, 2, 3, 4, 5]
    for r in curve:
        assert 0 <= r["val_mend_f1"] <= 1 and 0 <= r["val_agreement"] <= 1 and r["val_kl"] >= 0
        # ICL and zero-shot are scored once: the same reference in every record.
        assert (r["val_icl_f1"], r["val_zero_shot_f1"]) == (curve[0]["val_icl_f1"], curve[0]["val_zero_shot_f1"])
        assert all(r[k] == curve[0][k] for k in ("val_zero_shot_agreement", "val_zero_shot_kl"))
    # The distiller changed between the first and the last point, and the curve shows it.
    assert curve[0]["val_kl"] != curve[-1]["val_kl"]
    png = recipe.output_dir / "finetune" / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_run_without_eval_every_logs_no_curve_but_plots_its_loss(tiny):
    train(tiny("gpt2", *CURVES, "finetune.steps=2"), "finetune", console=QUIET)
    recipe = tiny("gpt2", "finetune.steps=2")
    train(recipe, "finetune", restart=True, console=QUIET)  # nothing of the first run's curve is left
    assert not _curve(recipe) and [r["step"] for r in _records(recipe)] == [1, 2]
    assert (recipe.output_dir / "finetune" / "curves.png").is_file()


def test_validation_tasks_are_held_out_of_stage_2(tiny):
    recipe = tiny("gpt2", "tasks.validation=[tiny_color]")
    tok = get_backend("gpt2").build(recipe).llm_tokenizer
    template = get_backend("gpt2").template(recipe)
    examples = TaskExamples(recipe.finetune, recipe.tasks, data_dir(recipe),
                            meta_train_tasks(recipe.finetune, data_dir(recipe), partition_for(recipe), recipe.tasks),
                            template, tok, recipe.seed)
    assert examples.names == ["tiny_length", "tiny_parity", "tiny_sound"]
    colors = {r["output"] for r in json.loads("[" + ",".join(
        Path("data/tiny/tasks/tiny_color/tiny_color_16384_100_train.jsonl").read_text().splitlines()) + "]")}
    targets = {tok.decode(examples.get(p).y).strip() for p in range(200)}
    assert not targets & colors


@pytest.mark.parametrize("overrides, message", [
    (["tasks.validation=[tiny_sentiment]"], r"not in its train list: \['tiny_sentiment'\]"),  # a test task
    (["tasks.validation=[tiny_sentiment]", "finetune.train_tasks=all"], r"test tasks .*: \['tiny_sentiment'\]"),
    (["tasks.validation=[tiny_color, tiny_color]"], "more than once"),
    (["tasks.validation=[tiny_nothing]"], "not in its train list"),
    (["tasks.validation=[tiny_parity, tiny_color, tiny_sound, tiny_length]"], "none would be left"),
    (["finetune.eval_every=5"], "finetune.eval_every needs validation tasks"),
    (["pretrain.eval_every=5"], "pretrain.eval_every needs validation tasks"),
])
def test_validation_tasks_are_checked_against_the_partition(tiny, overrides, message):
    with pytest.raises(RecipeError, match=message):
        tiny("gpt2", *overrides)


def test_a_train_task_that_another_partition_tests_may_validate(tiny):
    # MetaICL's partitions share tasks: glue-rte trains class_to_class and tests another partition
    recipe = tiny("gpt2", "tasks.partition=class_to_class", "tasks.validation=[glue-rte]")
    assert recipe.tasks.validation == ["glue-rte"]
    with pytest.raises(RecipeError, match=r"test tasks .*\['glue-rte'\]"):
        tiny("gpt2", "tasks.partition=class_to_class", "tasks.validation=[glue-rte]", "finetune.train_tasks=all")


def test_keep_best_writes_the_distiller_of_the_lowest_validation_kl(tiny):
    from safetensors import safe_open

    from mendctl.training.checkpoint import load_distiller

    recipe = tiny("gpt2", *CURVES, "finetune.steps=6", "finetune.lr=0.05", "finetune.keep_best=true")
    train(recipe, "finetune", console=QUIET)
    curve = _curve(recipe)
    best = min(curve, key=lambda r: r["val_kl"])
    path = recipe.output_dir / "finetune" / "best.safetensors"
    with safe_open(str(path), "pt") as f:
        provenance = json.loads(f.metadata()["provenance"])
    assert provenance["steps"] == best["step"] and provenance["val_kl"] == pytest.approx(best["val_kl"])
    # Loaded and scored again, it gives the curve's value at that step.
    from mendctl.training.curves import Validation
    from mendctl.models.distiller import distill

    backend = get_backend("gpt2")
    models = backend.build(recipe)
    load_distiller(models.distiller, path)
    validation = Validation(recipe, models, backend.template(recipe), 4)
    vectors = distill(models, validation.contexts, recipe.distiller.max_length, 2, validation.anchors)
    assert validation.score(vectors)["val_kl"] == pytest.approx(best["val_kl"], abs=1e-5)


def test_validation_baselines_are_scored_once_across_runs(tiny, monkeypatch):
    import mendctl.training.curves as curves

    recipe = tiny("gpt2", *CURVES)
    backend = get_backend("gpt2")
    models, template = backend.build(recipe), backend.template(recipe)
    calls = []
    real = curves.score
    monkeypatch.setattr(curves, "score", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    first = curves.Validation(recipe, models, template, 4)
    assert len(calls) == 4  # icl and zero-shot on two tasks
    again = curves.Validation(recipe, models, template, 4)
    assert len(calls) == 4 and again.baselines == first.baselines
    assert [r.losses for r in again.icl] == [r.losses for r in first.icl]
    curves.Validation(recipe, models, template, 3)  # other queries: scored
    assert len(calls) == 8
    uncached = tiny("gpt2", *CURVES, "eval.cache=false")
    curves.Validation(uncached, models, template, 4)
    assert len(calls) == 12


def test_the_zero_shot_bar_is_what_empty_vectors_score(tiny):
    import torch

    from mendctl.training.curves import Validation

    recipe = tiny("gpt2", *CURVES)
    backend = get_backend("gpt2")
    models = backend.build(recipe)
    validation = Validation(recipe, models, backend.template(recipe), 4)
    empty = [torch.zeros(0, models.llm.hidden_size) for _ in validation.sets]
    scores = validation.score(empty)
    assert scores["val_kl"] == pytest.approx(scores["val_zero_shot_kl"])
    assert scores["val_agreement"] == scores["val_zero_shot_agreement"]
    assert scores["val_zero_shot_kl"] > 0  # the tiny ICL differs from zero-shot: the bar is not trivially 0


def test_keep_best_needs_a_curve(tiny):
    with pytest.raises(RecipeError, match="finetune.keep_best chooses on the validation curve"):
        tiny("gpt2", "finetune.keep_best=true")


def test_ce_weight_zero_trains_on_kl_alone_and_still_logs_the_ce(tiny, monkeypatch):
    import mendctl.commands.train as trainer

    recipe = tiny("gpt2", "finetune.steps=2", "finetune.ce_weight=0")
    seen = []
    real = trainer.step_loss

    def spy(*args, **kwargs):
        stats = real(*args, **kwargs)
        seen.append(stats)
        return stats

    monkeypatch.setattr(trainer, "step_loss", spy)
    train(recipe, "finetune", console=QUIET)
    for stats in seen:
        assert stats.ce > 0 and stats.loss.item() == pytest.approx(stats.kl, rel=1e-5)
    assert all(r["ce"] > 0 for r in _records(recipe))


def test_resume_continues_the_curve(tiny, monkeypatch):
    import mendctl.commands.train as trainer

    overrides = (*CURVES, "finetune.steps=6", "finetune.save_every=3")
    straight = tiny("gpt2", *overrides)
    train(straight, "finetune", console=QUIET)
    recipe = tiny("gpt2", *overrides, f"output_dir={straight.output_dir}-interrupted")
    real, calls = trainer.step_loss, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:  # during step 6: step 5 is saved by the Ctrl-C handler, its record has no curve point
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "step_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(recipe, "finetune", console=QUIET)
    assert [r["step"] for r in _curve(recipe)] == [0, 2, 4]
    monkeypatch.setattr(trainer, "step_loss", real)
    train(recipe, "finetune", resume=True, console=QUIET)
    resumed, expected = _curve(recipe), _curve(straight)
    assert [r["step"] for r in resumed] == [0, 2, 4, 6]
    for a, b in zip(resumed, expected):
        assert a["val_kl"] == pytest.approx(b["val_kl"], abs=1e-5)
        assert a["val_mend_f1"] == b["val_mend_f1"] and a["val_agreement"] == b["val_agreement"]


def test_two_processes_score_on_the_main_process_only(tmp_path):
    import subprocess
    import sys

    launcher = Path(sys.executable).parent / "accelerate"
    out = tmp_path / "mp"
    result = subprocess.run([str(launcher), "launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
                             "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "mendctl", "finetune",
                             "recipes/tiny/gpt2.yaml", f"output_dir={out}", "finetune.steps=3", "finetune.save_every=3",
                             *CURVES], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in (out / "finetune" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_mend_f1" in r] == [0, 2, 3]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert (out / "finetune" / "curves.png").is_file()


def test_eval_sets_scores_several_demonstration_sets_a_task_and_averages_them(tiny):
    from mendctl.training.curves import Validation
    from mendctl.models.distiller import distill

    recipe = tiny("gpt2", *CURVES, "tasks.seeds=[100,13]", "finetune.eval_sets=2")
    backend = get_backend("gpt2")
    models, template = backend.build(recipe), backend.template(recipe)
    both = Validation(recipe, models, template, 4, recipe.finetune.eval_sets)
    assert len(both.sets) == 4 and len(set(both.contexts)) == 4  # two tasks, two other sets each
    alone = [Validation(tiny("gpt2", *CURVES, f"tasks.seeds=[{s}]"), models, template, 4) for s in (100, 13)]
    assert {c for v in alone for c in v.contexts} == set(both.contexts)
    scores = [v.score(distill(models, v.contexts, recipe.distiller.max_length, 2)) for v in alone]
    mean = both.score(distill(models, both.contexts, recipe.distiller.max_length, 2))
    for key in ("val_mend_f1", "val_kl", "val_agreement", "val_icl_f1", "val_zero_shot_kl"):
        assert mean[key] == pytest.approx((scores[0][key] + scores[1][key]) / 2, abs=1e-6), key
    with pytest.raises(RecipeError, match="eval_sets=3: tasks.seeds names 2"):
        tiny("gpt2", *CURVES, "tasks.seeds=[100,13]", "finetune.eval_sets=3")


def test_common_share_tells_one_shift_from_corrections_of_their_own():
    import torch

    from mendctl.training.curves import common_share

    g = torch.Generator().manual_seed(0)
    shift = torch.randn(4, 32, generator=g)
    assert common_share(shift.expand(10, 4, 32)) == pytest.approx(1.0)
    # 200 unrelated corrections share about 1/200 of their squared norm
    assert common_share(torch.randn(200, 4, 32, generator=g)) < 0.02
    # a shift under small noise of each set's own is still mostly shared
    assert 0.8 < common_share(shift + 0.3 * torch.randn(50, 4, 32, generator=g)) < 1.0
    assert common_share(torch.zeros(5, 4, 32)) == 0.0


def test_an_anchored_distiller_logs_how_far_its_vectors_move_and_how_much_all_sets_share(tiny):
    recipe = tiny("llama", *CURVES, "distiller.anchor=last", "distiller.max_correction=0.3", "finetune.steps=2",
                  "finetune.lr=1e-2")
    out = io.StringIO()
    train(recipe, "finetune", console=Console(file=out, width=300))
    curve = _curve(recipe)
    assert f"correction {curve[-1]['val_correction']:.3f} of the anchors" in out.getvalue()
    # the untrained distiller gives its anchors back: nothing moved
    assert curve[0]["val_correction"] == 0.0 and curve[0]["val_correction_shared"] == 0.0
    last = curve[-1]
    assert 0 < last["val_correction"] <= 0.3 + 1e-6
    assert 0 < last["val_correction_shared"] <= 1 + 1e-6
    # (an unanchored distiller logs neither: test_curves_are_logged_every_eval_every_steps_and_plotted)
