"""finetune.kl_on: options: the KL between ICL's and the student's distributions over each example's
options, the distributions `mendctl eval` ranks options by and measures agreement and KL on."""
import json
import shutil

import pytest
import torch
from rich.console import Console

import mendctl.commands.train as trainer
import mendctl.training.examples as examples_module
from mendctl.evaluation import metrics
from mendctl.training.examples import TaskExamples
from mendctl.commands.teacher import fill_teacher
from mendctl.training.losses import OptionKL
from mendctl.core.registry import get_backend
from mendctl.training.stage import build_stage
from mendctl.commands.train import Objective, step_loss, train

QUIET = Console(quiet=True)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_option_kl_is_the_mean_kl_the_curves_and_eval_report(temperature):
    torch.manual_seed(0)
    teacher = [torch.rand(n) * 4 for n in (2, 5, 3)]
    student = [torch.rand(n, requires_grad=True) * 4 for n in (2, 5, 3)]
    loss = OptionKL(temperature)(teacher, student)
    expected = metrics.mean_kl([(t / temperature).tolist() for t in teacher],
                               [(s / temperature).tolist() for s in student])
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert OptionKL(temperature)(teacher, [t.clone() for t in teacher]).item() == pytest.approx(0, abs=1e-6)
    # shifting every option's loss by one amount leaves the distribution, and the KL, as it was
    assert OptionKL(temperature)(teacher, [s + 3 for s in student]).item() == pytest.approx(loss.item(), rel=1e-5)
    with pytest.raises(ValueError, match="2 teacher queries for 3"):
        OptionKL()(teacher[:2], student)


def test_examples_carry_every_option_relabelled_as_the_demonstrations_with_the_target_among_them(tiny):
    recipe = tiny("llama", "finetune.remap_labels=1")
    models = get_backend("llama").build(recipe)
    examples = build_stage(recipe, "finetune").examples(models, get_backend("llama").template(recipe))
    tok = models.llm_tokenizer
    for position in range(8):
        e = examples.get(position)
        words = [tok.decode(o).strip() for o in e.options]
        assert len(words) >= 2 and e.y in e.options and len(set(words)) == len(words)
        shown = {line.rsplit(" ", 1)[1] for line in e.distiller_text.split("\n")}
        assert shown <= set(words)  # the demonstrations' (remapped) labels are options of the query


def _loss(models, recipe, batch, stage):
    return step_loss(models, models.distiller, batch, recipe, Objective.for_stage(stage, None))


def test_the_option_kl_step_compares_icl_and_the_vectors_on_every_option_and_trains_the_distiller(tiny):
    recipe = tiny("llama", "finetune.kl_on=options", "finetune.remap_labels=0.5", "distiller.anchor=last")
    stage, backend = build_stage(recipe, "finetune"), get_backend("llama")
    assert not stage.reads_teacher_cache and build_stage(tiny("llama"), "finetune").reads_teacher_cache
    models = backend.build(recipe)
    models.distiller.eval()
    batch = [stage.examples(models, backend.template(recipe)).get(p) for p in range(4)]
    llm = models.llm
    vectors = []
    real = models.distiller.forward
    models.distiller.forward = lambda *a, **k: vectors.append(real(*a, **k)) or vectors[-1]
    stats = _loss(models, recipe, batch, stage)
    # Each option's loss read another way: the whole prompt through target_logits, its tokens' mean CE.
    as_t = lambda ids: torch.tensor(ids, dtype=torch.long)  # noqa: E731

    def losses(prefix, e):
        out = []
        for o in e.options:
            t = llm.target_logits([prefix], [as_t(e.x)], [as_t(o)])
            out.append(torch.nn.functional.cross_entropy(t.logits[t.is_y], t.targets[t.is_y]))
        return torch.stack(out)

    with torch.no_grad():
        teacher = [losses(llm.embed(as_t(e.ctx)), e) for e in batch]
        student = [losses(v, e) for v, e in zip(vectors[0], batch)]
    assert stats.kl == pytest.approx(metrics.mean_kl([t.tolist() for t in teacher], [s.tolist() for s in student]),
                                     rel=1e-4)
    gold = [e.options.index(e.y) for e in batch]
    assert stats.ce == pytest.approx(sum(float(s[g]) for s, g in zip(student, gold)) / 4, rel=1e-4)
    assert stats.teacher_ce == pytest.approx(sum(float(t[g]) for t, g in zip(teacher, gold)) / 4, rel=1e-4)
    assert stats.loss.item() == pytest.approx(stats.kl + stats.ce, rel=1e-5)
    stats.loss.backward()
    trained = [p for p in models.distiller.parameters() if p.requires_grad]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
    ce_free = tiny("llama", "finetune.kl_on=options", "finetune.ce_weight=0", "finetune.remap_labels=0.5",
                   "distiller.anchor=last")
    with torch.no_grad():
        alone = _loss(models, ce_free, batch, build_stage(ce_free, "finetune"))
    assert alone.loss.item() == pytest.approx(stats.kl, rel=1e-5)


@pytest.mark.parametrize("backend", ["gpt2", "t5", "llama"])
def test_a_run_on_the_option_kl_trains_without_the_teacher_cache_which_the_filler_refuses(tiny, monkeypatch, backend):
    opened = []
    monkeypatch.setattr(trainer, "open_teacher", lambda *a, **k: opened.append(a))
    recipe = tiny(backend, "finetune.kl_on=options", "finetune.steps=3", "finetune.save_every=3")
    train(recipe, "finetune", console=QUIET)
    rows = [json.loads(line) for line in (recipe.output_dir / "finetune" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and opened == []
    assert all(r["kl"] >= 0 and r["ce"] > 0 and r["teacher_ce"] > 0 for r in rows)
    with pytest.raises(ValueError, match="kl_on is options"):
        fill_teacher(recipe, "finetune", console=QUIET)


def test_a_query_with_many_options_keeps_its_target_and_a_fixed_draw_of_others_and_nothing_else_changes(
        tiny, tmp_path, monkeypatch):
    root = tmp_path / "tasks"
    shutil.copytree("data/tiny/tasks", root)
    (root / "tiny_many").mkdir()
    labels = [f"label{i}" for i in range(40)]
    rows = [{"input": f"word {i}", "output": labels[i % 40], "options": labels} for i in range(60)]
    (root / "tiny_many" / "tiny_many_16384_100_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tiny("llama", f"tasks.data_dir={root}", "finetune.kl_on=options", "finetune.remap_labels=0.5")
    models = get_backend("llama").build(recipe)

    def draw():
        return TaskExamples(recipe.finetune, recipe.tasks, root, ["tiny_many"], get_backend("llama").template(recipe),
                            models.llm_tokenizer, recipe.seed)

    assert examples_module.MAX_OPTIONS == 16
    capped = [draw().get(p) for p in range(6)]
    assert [e.options for e in capped] == [draw().get(p).options for p in range(6)]  # the same draw every time
    monkeypatch.setattr(examples_module, "MAX_OPTIONS", 1000)
    for p, a in enumerate(capped):
        b = draw().get(p)
        assert (a.x, a.y, a.ctx, a.distiller_text) == (b.x, b.y, b.ctx, b.distiller_text)
        assert len(b.options) == 40 and len(a.options) == 16
        assert a.y in a.options and len(set(map(tuple, a.options))) == 16
        assert {tuple(o) for o in a.options} <= {tuple(o) for o in b.options}
