"""The teacher cache: the sparse KL, reuse across runs, and never a stale teacher."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from rich.console import Console

import mendctl.commands.train as trainer
from mendctl.cli import cli
from mendctl.training.losses import ForwardKL, SparseKL
from mendctl.models.model_sources import cache_dir
from mendctl.training.teacher_cache import TeacherCache, sparsify
from mendctl.commands.train import train

QUIET = Console(quiet=True)
ALL = "finetune.teacher_top_k=100000"  # clamped to the vocabulary: the full distribution


def metrics(recipe, stage="finetune") -> list[dict]:
    return [json.loads(line) for line in (recipe.output_dir / stage / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def teachers(monkeypatch):
    """The CachedTeacher of every run, to read its forward and hit counters."""
    opened = []
    real = trainer.open_teacher

    def spy(*args, **kwargs):
        opened.append(real(*args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(trainer, "open_teacher", spy)
    return opened


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sparse_kl_over_the_whole_vocabulary_is_the_exact_kl_and_a_lower_bound_below(temperature):
    torch.manual_seed(0)
    teacher, student = torch.randn(12, 50) * 3, torch.randn(12, 50, requires_grad=True)
    targets = torch.randint(0, 50, (12,))
    exact = ForwardKL(temperature)(teacher, student)
    (g_exact,) = torch.autograd.grad(exact, student)
    top = sparsify(teacher, targets, 50, temperature)
    assert torch.isneginf(top.log_rest).all()
    sparse = SparseKL(temperature)(top.logp, top.ids, top.log_rest, student)
    (g_sparse,) = torch.autograd.grad(sparse, student)
    torch.testing.assert_close(sparse, exact, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(g_sparse, g_exact, atol=1e-7, rtol=1e-5)
    assert torch.isfinite(g_sparse).all()
    torch.testing.assert_close(top.target_logp, torch.log_softmax(teacher, -1)[torch.arange(12), targets])
    bounds = []
    for k in (1, 5, 20, 49):
        top = sparsify(teacher, targets, k, temperature)
        loss = SparseKL(temperature)(top.logp, top.ids, top.log_rest, student)
        (grad,) = torch.autograd.grad(loss, student)
        assert torch.isfinite(grad).all()
        bounds.append(loss.item())
    assert 0 < bounds[0] <= bounds[1] + 1e-6 and all(b <= exact.item() + 1e-6 for b in bounds)
    assert bounds[-1] == pytest.approx(exact.item(), rel=0.05)
    with pytest.raises(ValueError, match="12 teacher rows for 11 student rows"):
        SparseKL()(top.logp, top.ids, top.log_rest, student[:11])


def test_training_on_the_cache_matches_the_exact_teacher(tiny, teachers):
    steps = ("finetune.steps=3",)
    exact = tiny("gpt2", *steps, "finetune.teacher_cache=false", "output_dir=" + str(tiny("gpt2").output_dir) + "-x")
    train(exact, "finetune", console=QUIET)
    assert teachers == []  # off means off
    full = tiny("gpt2", *steps, ALL, "output_dir=" + str(exact.output_dir) + "-all")
    train(full, "finetune", console=QUIET)
    top8 = tiny("gpt2", *steps, "finetune.teacher_top_k=8", "output_dir=" + str(exact.output_dir) + "-8")
    train(top8, "finetune", console=QUIET)
    for a, b, c in zip(metrics(exact), metrics(full), metrics(top8)):
        for key in ("loss", "kl", "ce", "teacher_ce"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
        assert c["teacher_ce"] == pytest.approx(a["teacher_ce"], rel=1e-5)
    # Step 1 sees the same student: the top-8 KL is a positive lower bound of the exact one.
    assert 0 < metrics(top8)[0]["kl"] <= metrics(exact)[0]["kl"] * (1 + 1e-5)


def test_a_second_run_with_other_lr_and_k_reads_the_cache_without_a_teacher_forward(tiny, teachers, tmp_path):
    first = tiny("gpt2", "finetune.steps=4", f"output_dir={tmp_path / 'one'}")
    train(first, "finetune", console=QUIET)
    assert teachers[0].forwards == 4 and teachers[0].cache.hits == 0
    second = tiny("gpt2", "finetune.steps=4", "finetune.lr=3e-3", "num_vectors=8", "finetune.save_every=1",
                  f"output_dir={tmp_path / 'two'}")
    train(second, "finetune", console=QUIET)
    assert teachers[1].cache.folder == teachers[0].cache.folder
    assert teachers[1].forwards == 0 and teachers[1].cache.hits == 16 and teachers[1].cache.misses == 0
    # Same teacher, so the same teacher CE, although the students differ.
    assert [m["teacher_ce"] for m in metrics(second)] == [m["teacher_ce"] for m in metrics(first)]
    assert [m["ce"] for m in metrics(second)] != [m["ce"] for m in metrics(first)]


def test_tokens_count_the_teacher_only_for_the_examples_it_read(tiny, tmp_path):
    """tokens/s: an example served from the cache costs no teacher tokens; a miss costs what no cache costs."""
    from mendctl.core.registry import get_backend
    from mendctl.training.stage import build_stage
    from mendctl.training.teacher_cache import CachedTeacher
    from mendctl.commands.train import Objective, step_loss

    recipe = tiny("gpt2")
    spec, backend = recipe.finetune, get_backend("gpt2")
    models = backend.build(recipe)
    examples = build_stage(recipe, "finetune").examples(models, backend.template(recipe))
    cached = CachedTeacher(models.llm, TeacherCache(tmp_path / "teacher"), spec.teacher_top_k, spec.temperature)

    def tokens(positions, teacher) -> int:
        batch = [examples.get(p) for p in positions]
        kl = SparseKL(spec.temperature) if teacher else ForwardKL(spec.temperature)
        return step_loss(models, models.distiller, batch, recipe, Objective(kl, 1.0, 1.0, teacher), positions).tokens

    def teacher_reads(positions) -> int:
        return sum(models.llm.bos_len + len(e.ctx) + len(e.x) + len(e.y) for e in map(examples.get, positions))

    first, overlapping = [0, 1, 2, 3], [2, 3, 4, 5]
    uncached, missed, hit = tokens(first, None), tokens(first, cached), tokens(first, cached)
    assert cached.forwards == 1 and cached.cache.hits == 4
    assert uncached == missed == hit + teacher_reads(first) and teacher_reads(first) > 0
    # Half the batch cached: only the other half's teacher tokens count.
    assert tokens(overlapping, cached) == tokens(overlapping, None) - teacher_reads([2, 3])
    assert cached.computed == [2, 3]  # the batch's indices of positions 4 and 5


def _other_data(tmp_path: Path) -> Path:
    data = tmp_path / "tasks"
    shutil.copytree("data/tiny/tasks", data)
    f = data / "tiny_color" / "tiny_color_16384_100_train.jsonl"
    f.write_text(f.read_text().replace('"red"', '"crimson"'))
    return data


@pytest.mark.parametrize("change", ["llm", "data", "template", "temperature", "top_k", "k"])
def test_a_teacher_made_for_something_else_is_never_used(change, tiny, teachers, tmp_path):
    overrides = {"llm": ["llm.random_init.init_std=0.3"], "data": [f"tasks.data_dir={_other_data(tmp_path)}"],
                 "template": ["template.separator=' | '"], "temperature": ["finetune.temperature=2.0"],
                 "top_k": ["finetune.teacher_top_k=16"], "k": ["tasks.k=3"]}[change]
    train(tiny("gpt2", "finetune.steps=2", f"output_dir={tmp_path / 'one'}"), "finetune", console=QUIET)
    train(tiny("gpt2", "finetune.steps=2", *overrides, f"output_dir={tmp_path / 'two'}"), "finetune", console=QUIET)
    assert teachers[1].cache.folder != teachers[0].cache.folder
    assert teachers[1].cache.hits == 0 and teachers[1].forwards == 2


def test_changed_examples_under_the_same_key_are_recomputed(tiny, teachers, tmp_path, monkeypatch):
    """The per-position input hash catches what the key misses (here: the key is made blind to the template)."""
    import mendctl.training.teacher_cache as tc

    monkeypatch.setattr(tc, "teacher_key", lambda *a: {"same": "key"})
    a = tiny("gpt2", "finetune.steps=2", f"output_dir={tmp_path / 'one'}")
    train(a, "finetune", console=QUIET)
    b = tiny("gpt2", "finetune.steps=2", "template.separator=' | '", f"output_dir={tmp_path / 'two'}")
    train(b, "finetune", console=QUIET)
    assert teachers[1].cache.folder == teachers[0].cache.folder
    assert teachers[1].cache.hits == 0 and teachers[1].forwards == 2
    train(tiny("gpt2", "finetune.steps=2", "finetune.lr=1e-4", "template.separator=' | '",
               f"output_dir={tmp_path / 'three'}"), "finetune", console=QUIET)
    assert teachers[2].forwards == 0 and teachers[2].cache.hits == 8  # b's entries replaced a's


def test_concurrent_writers_to_one_shard_keep_each_others_positions(tmp_path):
    top = sparsify(torch.randn(3, 10), torch.tensor([1, 2, 3]), 4, 1.0)
    a, b = TeacherCache(tmp_path), TeacherCache(tmp_path)
    a.put(0, "h0", top)
    b.put(1, "h1", top)
    assert b.get(0, "h0") is None  # not flushed yet: invisible to others
    a.flush()
    assert b.get(0, "h0") is not None  # the reader notices the rewritten shard
    b.flush()
    c = TeacherCache(tmp_path)
    for position, digest in ((0, "h0"), (1, "h1")):
        got = c.get(position, digest)
        torch.testing.assert_close(got.logp, top.logp)
        assert torch.equal(got.ids, top.ids)
    assert c.get(0, "other inputs") is None and c.misses == 1


def test_the_teacher_command_fills_what_training_reads(tiny, teachers, tmp_path):
    out = tmp_path / "filled"
    result = CliRunner().invoke(cli, ["teacher", "recipes/tiny/gpt2.yaml", "pretrain", f"output_dir={out}",
                                      "pretrain.steps=3", "pretrain.grad_accum=2"])
    assert result.exit_code == 0, result.output
    assert "24 positions, 24 computed" in result.output
    assert len(list((cache_dir() / "teacher").glob("*/shard_*.safetensors"))) == 1
    train(tiny("gpt2", "pretrain.steps=3", "pretrain.grad_accum=2", f"output_dir={out}"), "pretrain", console=QUIET)
    assert teachers[0].forwards == 0 and teachers[0].cache.hits == 24
    off = CliRunner().invoke(cli, ["teacher", "recipes/tiny/gpt2.yaml", "pretrain", f"output_dir={out}",
                                   "pretrain.teacher_cache=false"])
    assert off.exit_code == 2 and "pretrain.teacher_cache is false" in off.output


def test_an_episode_of_several_queries_reads_its_demonstrations_once_and_loses_what_each_query_alone_would(tiny):
    from mendctl.core.registry import get_backend
    from mendctl.training.stage import build_stage
    from mendctl.training.teacher_cache import teacher_logits
    from mendctl.commands.train import Objective, step_loss

    recipe = tiny("llama", "finetune.queries_per_episode=2")
    backend = get_backend("llama")
    models = backend.build(recipe)
    examples = build_stage(recipe, "finetune").examples(models, backend.template(recipe))
    batch = [examples.get(p) for p in range(4)]  # two episodes of two queries
    assert batch[0].ctx == batch[1].ctx != batch[2].ctx == batch[3].ctx
    distilled = []
    models.distiller.register_forward_hook(lambda m, args, out: distilled.append(args[0].shape[0]))
    objective = Objective(ForwardKL(recipe.finetune.temperature), 1.0, 1.0)
    together = step_loss(models, models.distiller, batch, recipe, objective)
    assert distilled == [2]  # one distiller row per episode, not per query
    alone = [step_loss(models, models.distiller, [e], recipe, objective) for e in batch]
    rows = [len(e.x) + len(e.y) for e in batch]
    for field in ("kl", "ce"):
        weighted = sum(getattr(s, field) * (n if field == "kl" else len(e.y)) for s, n, e in zip(alone, rows, batch))
        assert getattr(together, field) == pytest.approx(weighted / (sum(rows) if field == "kl" else
                                                                     sum(len(e.y) for e in batch)), rel=1e-4)
    # The teacher in any order of the batch: rows come back in batch order, as one forward per example gives.
    shuffled = [batch[2], batch[0], batch[3], batch[1]]
    with torch.no_grad():
        grouped = teacher_logits(models.llm, shuffled)
        each = [models.llm.target_logits([models.llm.embed(torch.tensor(e.ctx))], [torch.tensor(e.x)],
                                         [torch.tensor(e.y)]) for e in shuffled]
    torch.testing.assert_close(grouped.logits, torch.cat([o.logits for o in each]), atol=1e-4, rtol=0)
    assert grouped.example.tolist() == [i for i, o in enumerate(each) for _ in range(o.targets.shape[0])]


def test_runs_with_other_queries_per_episode_keep_their_teachers_apart(tiny, teachers, tmp_path):
    one = tiny("llama", "finetune.steps=2", f"output_dir={tmp_path / 'one'}")
    two = tiny("llama", "finetune.steps=2", "finetune.queries_per_episode=2", f"output_dir={tmp_path / 'two'}")
    for recipe in (one, two):
        train(recipe, "finetune", console=QUIET)
        assert len(metrics(recipe)) == 2
    assert teachers[0].cache.folder != teachers[1].cache.folder
    assert json.loads((teachers[1].cache.folder / "key.json").read_text())["queries_per_episode"] == 2
    assert "queries_per_episode" not in json.loads((teachers[0].cache.folder / "key.json").read_text())
    assert teachers[1].forwards == 2 and teachers[1].cache.misses == 8  # one teacher pass per step, 4 queries each


def test_kl_on_output_averages_the_kl_over_the_target_tokens_alone_cached_or_not(tiny, tmp_path):
    from mendctl.core.registry import get_backend
    from mendctl.training.stage import build_stage
    from mendctl.training.teacher_cache import CachedTeacher, teacher_logits
    from mendctl.commands.train import Objective, step_loss

    recipe = tiny("llama", "finetune.kl_on=output", ALL)
    stage, backend = build_stage(recipe, "finetune"), get_backend("llama")
    assert stage.kl_on == "output" and build_stage(tiny("llama"), "finetune").kl_on == "query"
    models = backend.build(recipe)
    models.distiller.eval()
    positions = [0, 1, 2, 3]
    batch = [stage.examples(models, backend.template(recipe)).get(p) for p in positions]
    students, real = [], models.llm.target_logits

    def spy(prefixes, xs, ys):  # keeps the student's rows: the calls whose prefix is the K vectors
        out = real(prefixes, xs, ys)
        if prefixes[0].shape[0] == recipe.num_vectors:
            students.append(out)
        return out

    models.llm.target_logits = spy
    with torch.no_grad():
        exact = step_loss(models, models.distiller, batch, recipe, Objective.for_stage(stage, None))
        teacher = teacher_logits(models.llm, batch)
        cached = CachedTeacher(models.llm, TeacherCache(tmp_path / "t"), recipe.finetune.teacher_top_k, 1.0)
        sparse = step_loss(models, models.distiller, batch, recipe, Objective.for_stage(stage, cached), positions)
        everywhere = step_loss(models, models.distiller, batch, recipe, Objective(ForwardKL(), 1.0, 1.0))
    y = students[0].is_y
    assert 0 < int(y.sum()) < y.shape[0]  # the inputs' tokens are left out, not all rows
    assert exact.kl == pytest.approx(ForwardKL()(teacher.logits[y], students[0].logits[y]).item(), rel=1e-5)
    assert sparse.kl == pytest.approx(exact.kl, rel=1e-4)
    assert everywhere.kl == pytest.approx(ForwardKL()(teacher.logits, students[0].logits).item(), rel=1e-5)
    assert everywhere.kl != pytest.approx(exact.kl, rel=1e-3)
