"""distill.refine_steps: vectors fitted to their own demonstrations after the distiller."""
import json
import statistics

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from mendctl import load_vectors
from mendctl.evaluation import flops
from mendctl.cli import cli
from mendctl.core.config import DistillSpec
from mendctl.training.losses import ForwardKL
from mendctl.training.refine import leave_one_out, recorded, refine, refine_flops, refinement, refinement_of
from mendctl.core.registry import get_backend
from mendctl.evaluation.scoring import demo_sets
from mendctl.core.vectors import VectorsMismatch, as_metadata


@pytest.mark.parametrize("backend", ["llama", "t5"])
def test_refining_lowers_the_kl_to_icl_on_the_demonstrations_and_leaves_the_llm_alone(tiny, backend):
    recipe = tiny(backend)
    models, template = get_backend(backend).build(recipe), get_backend(backend).template(recipe)
    llm, tok = models.llm, models.llm_tokenizer
    ds = demo_sets(recipe, template, tok)[0]
    episodes = leave_one_out(template, ds.demos, tok)
    assert len(episodes) == len(ds.demos) and all(ds.demos[0]["input"] not in tok.decode(c) for c, _, _ in episodes[:1])
    as_t = lambda ids: torch.tensor(ids, dtype=torch.long)  # noqa: E731
    xs, ys = [as_t(x) for _, x, _ in episodes], [as_t(y) for _, _, y in episodes]
    with torch.no_grad():
        teacher = llm.target_logits([llm.embed(as_t(c)) for c, _, _ in episodes], xs, ys).logits

    def kl(v):
        with torch.no_grad():
            return ForwardKL()(teacher, llm.target_logits([v] * len(xs), xs, ys).logits).item()

    torch.manual_seed(0)
    start = torch.randn(recipe.num_vectors, llm.hidden_size) * 0.1
    before = {k: v.clone() for k, v in llm.model.state_dict().items()}
    assert refine(llm, start, ds.demos, template, tok, 0, 1e-2) is start
    fitted = refine(llm, start, ds.demos, template, tok, 10, 1e-2)
    assert kl(fitted) < 0.8 * kl(start)
    assert not fitted.requires_grad and all(torch.equal(v, llm.model.state_dict()[k]) for k, v in before.items())
    assert refine(llm, start, ds.demos[:1], template, tok, 10, 1e-2) is start  # one demonstration: no episode
    seen = {}
    again = refine(llm, start, ds.demos, template, tok, 10, 1e-2, after_step=lambda n, v: seen.setdefault(n, v))
    # one run read at every step: the last is what it returns, and each step is its own copy, not a view
    assert list(seen) == list(range(1, 11)) and torch.equal(seen[10], again)
    assert not torch.equal(seen[3], seen[10]) and kl(seen[10]) < kl(seen[1])
    config, ed = llm.model.config, llm.is_encoder_decoder

    def query(prefix, x, y):
        return flops.llm_query_flops(config, prefix, len(x), [len(y)], ed, models.gated_mlp)

    teacher = sum(query(len(c), x, y) for c, x, y in episodes)
    student = sum(query(recipe.num_vectors, x, y) for _, x, y in episodes)
    assert teacher > student > 0
    for steps in (1, 10):  # the teacher once, the student's forward and backward (3 forwards) per step
        assert refine_flops(config, recipe.num_vectors, ds.demos, template, tok, steps, ed, models.gated_mlp) == \
            pytest.approx(teacher + 3 * steps * student)
    assert refine_flops(config, recipe.num_vectors, ds.demos, template, tok, 0, ed, models.gated_mlp) == 0


def test_a_fit_on_fewer_episodes_reads_only_the_first_ones_each_with_all_the_others(tiny, monkeypatch):
    recipe = tiny("llama")
    models, template = get_backend("llama").build(recipe), get_backend("llama").template(recipe)
    llm, tok = models.llm, models.llm_tokenizer
    ds = demo_sets(recipe, template, tok)[0]
    prefixes, real = [], llm.option_losses
    monkeypatch.setattr(llm, "option_losses", lambda p, x, o: prefixes.append(p.shape[0]) or real(p, x, o))
    start = torch.randn(recipe.num_vectors, llm.hidden_size) * 0.1
    fitted = refine(llm, start, ds.demos, template, tok, 3, 1e-2, on="options", ce_weight=0.1, episodes=2)
    contexts = [len(c) for c, _, _ in leave_one_out(template, ds.demos, tok)[:2]]
    # the teacher on the first two episodes (their whole leave-one-out contexts), then the student on those two a step
    assert prefixes == contexts + [recipe.num_vectors] * 2 * 3 and len(ds.demos) > 2
    assert not torch.equal(fitted, refine(llm, start, ds.demos, template, tok, 3, 1e-2, on="options", ce_weight=0.1))


def test_distill_and_eval_refine_record_it_and_count_its_cost(tmp_path):
    out = tmp_path / "run"
    base = ["recipes/tiny/llama.yaml", f"output_dir={out}"]
    runner = CliRunner()
    assert runner.invoke(cli, ["finetune", *base, "finetune.steps=1"]).exit_code == 0
    assert runner.invoke(cli, ["distill", *base]).exit_code == 0
    path = out / "vectors" / "tiny_sentiment" / "100.safetensors"
    plain = load_vectors(path)
    assert "refine_steps" not in plain.metadata
    result = runner.invoke(cli, ["distill", *base, "distill.refine_steps=3"])
    assert result.exit_code == 0, result.output
    assert "already up to date" not in result.output  # a refined file is not the plain one
    fitted = load_vectors(path)
    assert fitted.metadata["refine_steps"] == "3" and not torch.equal(fitted.vectors, plain.vectors)
    costs = {}
    for steps in (0, 3):
        for f in (out / "vectors").rglob("*.safetensors"):
            f.unlink()  # eval distils (and refines) on the fly
        result = runner.invoke(cli, ["eval", *base, f"distill.refine_steps={steps}", "eval.methods=[mend]",
                                     "eval.cache=false"])
        assert result.exit_code == 0, result.output
        costs[steps] = json.loads((out / "eval" / "results.json").read_text())
    per_set = [costs[0]["aggregate"]["mend"]["distill_flops_per_set"],
               costs[3]["aggregate"]["mend+fit@3"]["distill_flops_per_set"]]
    assert per_set[1] > per_set[0] > 0
    assert {s["refine_steps"] for s in costs[3]["vectors"]["mend+fit@3"]["sources"].values()} == {3}


def test_refining_from_the_anchors_runs_no_distiller_and_starts_at_their_embeddings(tmp_path, tiny):
    from mendctl.models.anchors import anchor_embeddings, set_anchors
    from mendctl.core.config import RecipeError

    out = tmp_path / "run"
    base = ["recipes/tiny/llama.yaml", f"output_dir={out}", "distiller.anchor=labels"]
    runner = CliRunner()  # nothing trained: no distiller under output_dir and no distill.checkpoint
    recipe = tiny("llama", "distiller.anchor=labels")
    models, template = get_backend("llama").build(recipe), get_backend("llama").template(recipe)
    ds = demo_sets(recipe, template, models.llm_tokenizer)[0]
    anchors = anchor_embeddings(models.llm, set_anchors(recipe, template, [ds], models.llm_tokenizer),
                                recipe.num_vectors)[0]
    path = out / "vectors" / ds.task / f"{ds.seed}.safetensors"
    steps = {}
    for n in (0, 2):
        result = runner.invoke(cli, ["distill", *base, "distill.refine_from=anchors", f"distill.refine_steps={n}"])
        assert result.exit_code == 0, result.output
        steps[n] = load_vectors(path)
        assert steps[n].metadata["refine_from"] == "anchors"
        assert steps[n].metadata["distiller_hash"] == "untrained"
    assert torch.equal(steps[0].vectors, anchors) and not torch.equal(steps[2].vectors, anchors)
    for f in (out / "vectors").rglob("*.safetensors"):
        f.unlink()  # eval makes them on the fly
    result = runner.invoke(cli, ["eval", *base, "distill.refine_from=anchors", "distill.refine_steps=0",
                                 "eval.methods=[mend]", "eval.cache=false"])
    assert result.exit_code == 0, result.output
    aggregate = json.loads((out / "eval" / "results.json").read_text())["aggregate"]
    assert list(aggregate) == ["fitted@0"] and aggregate["fitted@0"]["distill_flops_per_set"] == 0
    with pytest.raises(RecipeError, match="refine_from: anchors needs anchors"):
        tiny("llama", "distiller.anchor=none", "distill.refine_from=anchors")


def _first_set_episodes(tiny):
    """The tiny llama recipe's models, its first demonstration set, and that set's leave-one-out episodes and options."""
    from mendctl.training.refine import demo_options

    recipe = tiny("llama")
    models, template = get_backend("llama").build(recipe), get_backend("llama").template(recipe)
    ds = demo_sets(recipe, template, models.llm_tokenizer)[0]
    tok = models.llm_tokenizer
    return recipe, models, template, ds, leave_one_out(template, ds.demos, tok), demo_options(template, ds.demos, tok)


def test_refining_on_the_options_lowers_the_option_kl_on_the_demonstrations_and_is_recorded(tiny, tmp_path):
    from mendctl.core.config import RecipeError
    from mendctl.training.losses import OptionKL

    recipe, models, template, ds, episodes, options = _first_set_episodes(tiny)
    llm, tok = models.llm, models.llm_tokenizer
    assert [len(o) for o in options] == [len(d["options"]) for d in ds.demos]
    assert all(y in opts for (_, _, y), opts in zip(episodes, options))  # each demonstration's output is an option
    as_t = lambda ids: torch.tensor(ids, dtype=torch.long)  # noqa: E731
    opts = [[as_t(o) for o in q] for q in options]
    with torch.no_grad():
        teacher = [llm.option_losses(llm.embed(as_t(c)), as_t(x), o) for (c, x, _), o in zip(episodes, opts)]

    def kl(v):
        with torch.no_grad():
            return OptionKL()(teacher, [llm.option_losses(v, as_t(x), o) for (_, x, _), o in zip(episodes, opts)]).item()

    torch.manual_seed(0)
    start = torch.randn(recipe.num_vectors, llm.hidden_size) * 0.1
    fitted = refine(llm, start, ds.demos, template, tok, 10, 1e-2, on="options")
    assert kl(fitted) < 0.8 * kl(start)
    config, gm = llm.model.config, models.gated_mlp
    student = sum(flops.llm_query_flops(config, recipe.num_vectors, len(x), [len(o) for o in q], False, gm)
                  for (_, x, _), q in zip(episodes, options))
    teacher_cost = sum(flops.llm_query_flops(config, len(c), len(x), [len(o) for o in q], False, gm)
                       for (c, x, _), q in zip(episodes, options))
    assert refine_flops(config, recipe.num_vectors, ds.demos, template, tok, 2, False, gm, "options") == \
        pytest.approx(teacher_cost + 6 * student)
    out = tmp_path / "run"
    base = ["recipes/tiny/llama.yaml", f"output_dir={out}"]
    runner = CliRunner()
    assert runner.invoke(cli, ["finetune", *base, "finetune.steps=1"]).exit_code == 0
    result = runner.invoke(cli, ["distill", *base, "distill.refine_steps=2", "distill.refine_on=options"])
    assert result.exit_code == 0, result.output
    assert load_vectors(out / "vectors" / ds.task / f"{ds.seed}.safetensors").metadata["refine_on"] == "options"
    with pytest.raises(RecipeError, match="refine_on: options needs distill.refine_steps"):
        tiny("llama", "distill.refine_on=options")


def test_refining_with_the_label_ce_lowers_the_demonstrations_own_label_loss_and_is_recorded(tiny, tmp_path):
    from mendctl.core.config import RecipeError

    recipe, models, template, ds, episodes, options = _first_set_episodes(tiny)
    llm, tok = models.llm, models.llm_tokenizer
    as_t = lambda ids: torch.tensor(ids, dtype=torch.long)  # noqa: E731

    def label_loss(v):  # the mean over demonstrations of the own label's mean token loss, as the CE term reads it
        with torch.no_grad():
            return statistics.fmean(llm.option_losses(v, as_t(x), [as_t(o) for o in q])[q.index(y)].item()
                                    for (_, x, y), q in zip(episodes, options))

    torch.manual_seed(0)
    start = torch.randn(recipe.num_vectors, llm.hidden_size) * 0.1
    kl_only = refine(llm, start, ds.demos, template, tok, 10, 1e-2, on="options")
    with_ce = refine(llm, start, ds.demos, template, tok, 10, 1e-2, on="options", ce_weight=5.0)
    assert label_loss(with_ce) < label_loss(kl_only)
    out = tmp_path / "run"
    base = ["recipes/tiny/llama.yaml", f"output_dir={out}", "distiller.anchor=labels", "distill.refine_from=anchors",
            "distill.refine_steps=1", "distill.refine_on=options"]
    runner = CliRunner()
    path = out / "vectors" / ds.task / f"{ds.seed}.safetensors"
    assert runner.invoke(cli, ["distill", *base]).exit_code == 0
    assert "refine_ce_weight" not in load_vectors(path).metadata  # files made before the key stay up to date
    result = runner.invoke(cli, ["distill", *base, "distill.refine_ce_weight=0.5"])
    assert result.exit_code == 0 and "already up to date" not in result.output, result.output
    assert load_vectors(path).metadata["refine_ce_weight"] == "0.5"
    result = runner.invoke(cli, ["eval", *base, "distill.refine_ce_weight=0.5", "eval.methods=[mend]", "eval.cache=false"])
    assert result.exit_code == 0, result.output
    sources = json.loads((out / "eval" / "results.json").read_text())["vectors"]["fitted@1"]["sources"].values()
    assert {s["refine_ce_weight"] for s in sources} == {0.5}  # read from the files distill wrote
    result = runner.invoke(cli, ["distill", *base])  # back to the KL alone: the files with the label loss are stale
    assert result.exit_code == 0 and "already up to date" not in result.output, result.output
    assert "refine_ce_weight" not in load_vectors(path).metadata
    made = load_vectors(path)
    save_file({"vectors": made.vectors}, str(path), metadata=made.metadata | {"refine_steps": "many"})
    result = runner.invoke(cli, ["eval", *base, "eval.methods=[mend]", "eval.cache=false"])
    assert result.exit_code == 0, result.output  # the set is distilled anew, saying why
    sources = json.loads((out / "eval" / "results.json").read_text())["vectors"]["fitted@1"]["sources"]
    assert "refine_steps='many'" in sources[f"{ds.task}/{ds.seed}"]["reason"]
    result = runner.invoke(cli, ["distill", *base])
    assert "distilled 1/1" in result.output and load_vectors(path).metadata["refine_steps"] == "1"  # that file alone
    with pytest.raises(RecipeError, match="refine_ce_weight needs distill.refine_on: options"):
        tiny("llama", "distill.refine_steps=1", "distill.refine_ce_weight=1")


@pytest.mark.parametrize("keys", [{}, {"refine_steps": 30, "refine_from": "anchors", "refine_on": "options",
                                       "refine_ce_weight": 0.1}, {"refine_steps": 5, "refine_lr": 0.01}])
def test_a_vectors_file_records_its_refinement_so_that_it_reads_back_whole(keys):
    spec = DistillSpec(**keys)
    written = as_metadata(recorded(spec))
    assert set(written) == set(keys)  # keys at their defaults are left out
    assert refinement_of(written, "f") == refinement(spec)


def test_a_vectors_file_with_a_bad_refinement_key_is_named_with_the_key():
    with pytest.raises(VectorsMismatch, match=r"f: its refinement metadata is not valid \(refine_steps='many'"):
        refinement_of({"refine_steps": "many", "refine_on": "options"}, "f")
    with pytest.raises(VectorsMismatch, match="refine_from='teacher'"):
        refinement_of({"refine_from": "teacher"}, "f")
