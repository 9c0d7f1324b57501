import io
import json
import shutil
import statistics
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from rich.console import Console

from mendctl.training.checkpoint import save_distiller
from mendctl.cli import cli
from mendctl.evaluation.compress import compress
from mendctl.core.config import METHODS, load_recipe
from mendctl.data.metaicl import DataError, load_split
from mendctl.commands.distill import run_distill
from mendctl.evaluation.scoring import demo_sets, query_set
from mendctl.training.trained import UNTRAINED, load_trained
from mendctl.commands.eval import _prefix, run_eval
from mendctl.evaluation.metrics import accuracy, macro_f1
from mendctl.core.registry import get_backend
from mendctl.models.render import context_ids
from mendctl.data.workspace import data_dir

TINY = Path(__file__).resolve().parent.parent / "recipes" / "tiny"
DATA = Path(__file__).resolve().parent.parent / "data" / "tiny" / "tasks"
BACKENDS = ["gpt2", "t5", "llama"]
TEST_TASKS = ["tiny_sentiment", "tiny_compare"]



@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    # Baseline scores are cached under MENDCTL_CACHE: each test starts from an empty cache.
    monkeypatch.setenv("MENDCTL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _recipe(backend: str, out: Path, *overrides: str):
    return load_recipe(TINY / f"{backend}.yaml", [f"output_dir={out}", *overrides])


def _quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


def _with_distiller(recipe) -> None:
    """Saves the recipe's (untrained) distiller where `finetune` would: plumbing needs no training."""
    models, _ = load_trained(recipe, require=False)
    save_distiller(recipe.stage_dir("finetune"), models.distiller, recipe, {})


def _predictions(results: dict, method: str) -> dict:
    return {f"{t}/{s}": r["methods"][method]["predictions"]
            for t, task in results["tasks"].items() for s, r in task["seeds"].items()}


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_method_runs(backend, tmp_path):
    recipe = _recipe(backend, tmp_path)
    _with_distiller(recipe)
    console = _quiet()
    results = run_eval(recipe, limit=2, console=console)

    on_disk = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert on_disk["aggregate"].keys() == set(METHODS)
    assert list(on_disk["tasks"]) == TEST_TASKS
    for task in on_disk["tasks"].values():
        assert task["metric"] == "macro-f1"
        assert list(task["seeds"]) == ["100", "13"]
        for seed in task["seeds"].values():
            runs = seed["methods"]
            assert runs.keys() == set(METHODS)
            assert all(r["n"] == 2 and len(r["predictions"]) == 2 and 0 <= r["score"] <= 1 for r in runs.values())
            assert runs["zero-shot"]["prefix_tokens"] == 0
            assert runs["icl-truncated"]["prefix_tokens"] == runs["mend"]["prefix_tokens"] == recipe.num_vectors
            assert runs["llmlingua"]["prefix_tokens"] == recipe.num_vectors
            assert runs["llmlingua"]["flops_per_query"] == runs["icl-truncated"]["flops_per_query"]
            assert runs["llmlingua"]["compress_flops"] > 0
            assert runs["icl"]["prefix_tokens"] > recipe.num_vectors
            # Same prefix length, same query: truncated ICL and MEND cost the same; full ICL more.
            assert runs["icl"]["flops_per_query"] > runs["mend"]["flops_per_query"] == runs["icl-truncated"][
                "flops_per_query"] > runs["zero-shot"]["flops_per_query"]
            assert runs["icl"]["memory_bytes"] > runs["mend"]["memory_bytes"]
            assert runs["mend"]["distill_flops"] > 0
            assert 0 <= seed["vs_icl"]["mend"]["agreement"] <= 1 and seed["vs_icl"]["mend"]["mean_kl"] >= 0
            assert seed["n_queries"] == 2 and seed["available"] == 12
    assert {s["source"] for s in on_disk["vectors"]["mend"]["sources"].values()} == {"distilled"}
    assert on_disk["vectors"]["mend"]["method"] == "mend" and on_disk["partial"] is True
    assert on_disk["aggregate"]["icl"]["flops_ratio_to_icl"] == 1.0
    assert on_disk["aggregate"]["mend"]["flops_ratio_to_icl"] < 1.0
    assert on_disk["memory_kind"] == "estimated" and on_disk["limit"] == 2
    assert "own implementation" in on_disk["llmlingua"]["implementation"]
    assert on_disk["aggregate"]["llmlingua"]["compress_flops_per_set"] > 0
    assert on_disk["recipe"]["backend"] == backend and "versions" in on_disk["provenance"]
    assert on_disk == json.loads(json.dumps(results, default=str))

    markdown = (tmp_path / "eval" / "results.md").read_text()
    printed = console.file.getvalue()
    for method in METHODS:
        assert f"| {method} |" in markdown
        assert method in printed
    assert "made on the fly" in printed and str(tmp_path / "vectors") in printed
    assert (tmp_path / "eval" / "quality_vs_cost.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("backend", ["gpt2", "llama"])
def test_results_are_stamped_with_the_llm_the_distiller_and_the_special_tokens(backend, tmp_path):
    recipe = _recipe(backend, tmp_path, "eval.methods=[zero-shot, mend]")
    _with_distiller(recipe)
    models, distiller_hash = load_trained(recipe)
    run_eval(recipe, limit=1, console=_quiet())

    stamp = json.loads((tmp_path / "eval" / "results.json").read_text())["models"]
    tok = models.llm_tokenizer
    assert stamp == {"backend": backend, "llm_id": models.llm_id, "llm_config_hash": models.llm_config_hash,
                     "distiller_hash": distiller_hash,
                     # The tiny recipes' byte tokenizer: three specials, no unk.
                     "tokenizer": {"bos": {"token": "<s>", "id": tok.bos_token_id},
                                   "eos": {"token": "</s>", "id": tok.eos_token_id},
                                   "pad": {"token": "<pad>", "id": tok.pad_token_id},
                                   "unk": {"token": None, "id": None}}}
    assert distiller_hash != UNTRAINED and None not in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    markdown = (tmp_path / "eval" / "results.md").read_text()
    assert f"LLM: `{models.llm_id}` ({backend}, config {models.llm_config_hash}); distiller: {distiller_hash}" \
        in markdown
    assert f"bos `<s>` = {tok.bos_token_id}, eos `</s>` = {tok.eos_token_id}, pad `<pad>` = {tok.pad_token_id}, " \
        "unk none" in markdown


def test_mend_without_vectors_needs_a_trained_distiller(tmp_path):
    recipe = _recipe("gpt2", tmp_path)
    with pytest.raises(FileNotFoundError, match="no trained distiller.*mendctl distill"):
        run_eval(recipe, limit=1, console=_quiet())
    # Without mend nothing needs a distiller.
    results = run_eval(_recipe("gpt2", tmp_path, "eval.methods=[zero-shot, icl]"), limit=1, console=_quiet())
    assert set(results["aggregate"]) == {"zero-shot", "icl"} and "vs_icl" not in results


def test_mend_from_files_equals_mend_on_the_fly(tmp_path):
    recipe = _recipe("gpt2", tmp_path, "eval.methods=[icl, mend]")
    _with_distiller(recipe)
    run_distill(recipe, console=_quiet())
    from_files = run_eval(recipe, limit=4, console=_quiet())
    assert {s["source"] for s in from_files["vectors"]["mend"]["sources"].values()} == {"file"}

    # Vectors files are enough on their own: no distiller needed.
    shutil.move(recipe.stage_dir("finetune"), tmp_path / "kept")
    assert _predictions(run_eval(recipe, limit=4, console=_quiet()), "mend") == _predictions(from_files, "mend")

    # The same distiller again (building a new one would draw another projector).
    shutil.move(tmp_path / "kept", recipe.stage_dir("finetune"))
    shutil.rmtree(tmp_path / "vectors")
    on_the_fly = run_eval(recipe, limit=4, console=_quiet())
    assert {s["source"] for s in on_the_fly["vectors"]["mend"]["sources"].values()} == {"distilled"}
    assert _predictions(on_the_fly, "mend") == _predictions(from_files, "mend")
    kl = lambda results: [s["vs_icl"]["mend"]["mean_kl"] for t in results["tasks"].values()  # noqa: E731
                          for s in t["seeds"].values()]
    assert kl(on_the_fly) == pytest.approx(kl(from_files), abs=1e-5)


def test_warns_when_vectors_files_come_from_another_distiller(tmp_path):
    recipe = _recipe("gpt2", tmp_path, "eval.methods=[mend]")
    models, _ = load_trained(recipe, require=False)
    save_distiller(recipe.stage_dir("finetune"), models.distiller, recipe, {})
    run_distill(recipe, console=_quiet())
    with torch.no_grad():
        models.distiller.placeholders.add_(1.0)  # "retrained" after the vectors were made
    save_distiller(recipe.stage_dir("finetune"), models.distiller, recipe, {})
    console = _quiet()
    sources = run_eval(recipe, limit=1, console=console)["vectors"]["mend"]["sources"]
    assert {s["source"] for s in sources.values()} == {"file"}
    assert "made by another distiller" in console.file.getvalue()


def test_vectors_of_other_demonstrations_are_not_used(tmp_path):
    recipe = _recipe("gpt2", tmp_path, "eval.methods=[mend]")
    _with_distiller(recipe)
    run_distill(recipe, console=_quiet())
    # Another separator renders other demonstration text: the saved vectors no longer stand for it.
    other = _recipe("gpt2", tmp_path, "eval.methods=[mend]", "template.separator=' | '")
    sources = run_eval(other, limit=1, console=_quiet())["vectors"]["mend"]["sources"]
    assert all(s["source"] == "distilled" and "other demonstrations" in s["reason"] for s in sources.values())


def _task_copy(tmp_path: Path) -> tuple[Path, Path]:
    data = tmp_path / "tasks"
    for task in TEST_TASKS:
        shutil.copytree(DATA / task, data / task)
    partition = tmp_path / "partition.json"
    partition.write_text(json.dumps({"train": ["tiny_parity"], "test": TEST_TASKS,
                                     "task_types": {"tiny_sentiment": "classification"}}))
    return data, partition


def _rewrite_line(path: Path, number: int, change) -> None:
    lines = path.read_text().splitlines()
    row = json.loads(lines[number - 1])
    change(row)
    lines[number - 1] = json.dumps(row)
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("change, message", [
    (lambda row: row.update(options=["yes", "no"]), "is not among the options"),
    (lambda row: row.update(options=[]), "no options to score"),
], ids=["no-gold", "no-options"])
def test_bad_option_list_fails_with_file_and_line(tmp_path, change, message):
    data, partition = _task_copy(tmp_path)
    bad = data / "tiny_compare" / "tiny_compare_4_13_test.jsonl"
    _rewrite_line(bad, 3, change)
    recipe = _recipe("gpt2", tmp_path / "out", f"tasks.data_dir={data}", f"tasks.partition={partition}",
                     "eval.methods=[zero-shot]")
    with pytest.raises(DataError, match=f"{bad}:3: .*{message}"):
        run_eval(recipe, console=_quiet())


def test_metric_per_task_type_and_mean_over_seeds_then_tasks(tmp_path):
    data, partition = _task_copy(tmp_path)  # declares tiny_compare as multi-choice: accuracy
    recipe = _recipe("gpt2", tmp_path / "out", f"tasks.data_dir={data}", f"tasks.partition={partition}",
                     "eval.methods=[zero-shot, icl]")
    results = run_eval(recipe, limit=6, console=_quiet())
    tasks = results["tasks"]
    assert tasks["tiny_sentiment"]["metric"] == "macro-f1" and tasks["tiny_compare"]["metric"] == "accuracy"
    for task, metric in (("tiny_sentiment", macro_f1), ("tiny_compare", accuracy)):
        for seed, run in tasks[task]["seeds"].items():
            rows = load_split(data, task, 4, int(seed), "test")[:6]
            predicted = [r["options"][i] for r, i in zip(rows, run["methods"]["icl"]["predictions"])]
            assert run["methods"]["icl"]["score"] == pytest.approx(metric(predicted, [r["output"] for r in rows]))
    per_task = [statistics.fmean(s["methods"]["icl"]["score"] for s in t["seeds"].values()) for t in tasks.values()]
    assert results["aggregate"]["icl"]["score"] == pytest.approx(statistics.fmean(per_task))


def test_prefixes(tmp_path):
    recipe = _recipe("llama", tmp_path)
    models, _ = load_trained(recipe, require=False)
    template = get_backend(recipe.backend).template(recipe)
    ds = demo_sets(recipe, template, models.llm_tokenizer)[0]
    qs = query_set(data_dir(recipe), ds, recipe.tasks.k, template, models.llm_tokenizer, 1)
    ids = torch.tensor(context_ids(template, ds.context, models.llm_tokenizer))
    embed = models.llm.embed
    assert _prefix("zero-shot", qs, models, template, 4, {}).shape == (0, models.llm.hidden_size)
    assert torch.equal(_prefix("icl", qs, models, template, 4, {}), embed(ids))
    # Truncated ICL keeps the demonstrations nearest the query: the last K tokens.
    assert torch.equal(_prefix("icl-truncated", qs, models, template, 4, {}), embed(ids[-4:]))
    lingua = {qs.key: compress(models.llm, ids.tolist(), 4)}
    assert torch.equal(_prefix("llmlingua", qs, models, template, 4, {}, lingua), embed(torch.tensor(lingua[qs.key].ids)))
    # The separator opens the query exactly when something precedes it.
    assert qs.rendered(_prefix("zero-shot", qs, models, template, 4, {})) is qs.alone
    assert qs.rendered(_prefix("icl-truncated", qs, models, template, 4, {})) is qs.queries
    assert models.llm_tokenizer.decode(qs.queries[0].x) == template.separator + models.llm_tokenizer.decode(qs.alone[0].x)


def _reference_losses(llm, prefix, x, options) -> list[float]:
    """Each option scored on its own by the plain transformers model: one full forward, no cache."""
    model, out = llm.model, []
    for o in options:
        if llm.is_encoder_decoder:
            enc = torch.cat([prefix, llm.embed(x)]).unsqueeze(0)
            out.append(float(model(inputs_embeds=enc, labels=o.unsqueeze(0)).loss))
        else:
            seq = torch.cat([prefix, llm.embed(x), llm.embed(o)]).unsqueeze(0)
            logits = model(inputs_embeds=seq).logits[0]
            start = prefix.shape[0] + x.shape[0]
            out.append(float(F.cross_entropy(logits[start - 1:start - 1 + len(o)], o)))
    return out


@pytest.mark.parametrize("prefix_len", [0, 7])
@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_prefix_scoring_equals_separate_full_forwards(backend, prefix_len, tmp_path):
    models, _ = load_trained(_recipe(backend, tmp_path), require=False)
    llm = models.llm
    gen = torch.Generator().manual_seed(0)
    prefix = torch.randn(prefix_len, llm.hidden_size, generator=gen) * 0.1
    x = torch.randint(3, 200, (6,), generator=gen)
    options = [torch.randint(3, 200, (n,), generator=gen) for n in (1, 4, 2, 5)]
    # The reference reads BOS first exactly for the families that use one (llama here), and never
    # anything else: option_losses must add it itself.
    bos = [models.llm_tokenizer.bos_token_id] if get_backend(backend).add_bos else []
    assert (backend == "llama") == bool(bos)
    with torch.no_grad():
        shared = llm.option_losses(prefix, x, options).tolist()
        separate = _reference_losses(llm, torch.cat([llm.embed(torch.tensor(bos, dtype=torch.long)), prefix]),
                                     x, options)
    assert shared == pytest.approx(separate, abs=1e-4)


# Predictions of `icl` on the tiny gpt2 recipe (random init, seed 0), first 4 queries per task and
# seed. Checked identical across repeated runs and across 1 and 2 intra-op threads on the dev
# machine; the two option losses differ by at least 0.08 on each, so float noise cannot flip them.
GOLDEN_ICL = {"tiny_sentiment/100": [1, 1, 0, 0], "tiny_sentiment/13": [0, 0, 0, 0],
              "tiny_compare/100": [0, 0, 0, 0], "tiny_compare/13": [0, 0, 0, 0]}


def test_golden_icl_predictions(tmp_path):
    results = run_eval(_recipe("gpt2", tmp_path, "eval.methods=[icl]"), limit=4, console=_quiet())
    assert _predictions(results, "icl") == GOLDEN_ICL


def test_cli_eval(tmp_path):
    recipe = str(TINY / "gpt2.yaml")
    ok = CliRunner().invoke(cli, ["eval", recipe, f"output_dir={tmp_path}", "eval.methods=[zero-shot,icl]",
                                  "--limit", "1"])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "eval" / "results.json").is_file()
    missing = CliRunner().invoke(cli, ["eval", recipe, f"output_dir={tmp_path}", "--limit", "1"])
    assert missing.exit_code == 2 and "no trained distiller" in missing.output


# --------------------------------------------------------------------------- baseline cache, bootstrap


def _count_scoring(monkeypatch) -> list[int]:
    """Prefix length of every scoring pass run_eval makes."""
    import mendctl.commands.eval as evaluate

    calls, real = [], evaluate.score
    monkeypatch.setattr(evaluate, "score", lambda llm, prefix, *a, **k: calls.append(prefix.shape[0])
                        or real(llm, prefix, *a, **k))
    return calls


def _baselines(results: dict) -> dict:
    return {f"{t}/{s}/{m}": {k: v for k, v in r.items() if k != "from_cache"}
            for t, task in results["tasks"].items() for s, seed in task["seeds"].items()
            for m, r in seed["methods"].items() if m != "mend"}


def test_a_second_eval_with_another_distiller_scores_only_mend(tmp_path, monkeypatch):
    recipe = _recipe("gpt2", tmp_path)
    _with_distiller(recipe)
    calls = _count_scoring(monkeypatch)
    first = run_eval(recipe, limit=3, console=_quiet())
    assert len(calls) == len(METHODS) * 4  # 2 tasks x 2 seeds
    models, _ = load_trained(recipe)
    with torch.no_grad():
        models.distiller.placeholders.add_(1.0)
    save_distiller(recipe.stage_dir("finetune"), models.distiller, recipe, {})

    calls.clear()
    console = _quiet()
    second = run_eval(_recipe("gpt2", tmp_path, "eval.retime_queries=0"), limit=3, console=console)
    assert calls == [recipe.num_vectors] * 4  # MEND's K vectors, nothing else
    # Scores, predictions and the latency measured the first time, which no query of this run timed.
    assert _baselines(second) == {k: {**v, "timed_queries": 0} for k, v in _baselines(first).items()}
    methods = [s["methods"] for t in second["tasks"].values() for s in t["seeds"].values()]
    assert all(m[b]["from_cache"] for m in methods for b in ("zero-shot", "icl", "icl-truncated"))
    assert not any(m["mend"]["from_cache"] for m in methods)
    assert _predictions(second, "mend") != _predictions(first, "mend") or \
        second["vs_icl"]["mend"]["mean_kl"] != first["vs_icl"]["mend"]["mean_kl"]
    assert "c: scores and latency from the baseline cache" in console.file.getvalue()
    assert second["aggregate"]["icl"]["latency_ms_per_query"] == first["aggregate"]["icl"]["latency_ms_per_query"]

    calls.clear()
    run_eval(_recipe("gpt2", tmp_path, "eval.cache=false"), limit=3, console=_quiet())
    assert len(calls) == len(METHODS) * 4


@pytest.mark.parametrize("change", ["template", "data", "limit", "k-of-truncation"])
def test_a_stale_cache_entry_is_never_used(tmp_path, monkeypatch, change):
    data, partition = _task_copy(tmp_path)
    base = [f"tasks.data_dir={data}", f"tasks.partition={partition}", "eval.methods=[zero-shot, icl, icl-truncated]",
            "eval.retime_queries=0"]
    run_eval(_recipe("gpt2", tmp_path / "out", *base), limit=3, console=_quiet())
    calls = _count_scoring(monkeypatch)
    run_eval(_recipe("gpt2", tmp_path / "out", *base), limit=3, console=_quiet())
    assert calls == []  # unchanged: everything from the cache
    limit, extra = 3, []
    if change == "template":
        extra = ["template.separator=' | '"]
    elif change == "data":  # one test query of one seed edited: that (task, seed) only
        _rewrite_line(data / "tiny_compare" / "tiny_compare_4_13_test.jsonl", 2, lambda row: row.update(input="changed"))
    elif change == "limit":
        limit = 2
    else:
        extra = ["num_vectors=3"]
    run_eval(_recipe("gpt2", tmp_path / "out", *base, *extra), limit=limit, console=_quiet())
    expected = {"template": 12, "data": 3, "limit": 12, "k-of-truncation": 4}[change]
    assert len(calls) == expected


@pytest.mark.parametrize("classification", [True, False])
def test_batched_metric_equals_the_metric_on_every_resample(classification):
    import numpy as np

    from mendctl.evaluation.bootstrap import batch_metric

    rng = np.random.default_rng(0)
    pred, gold = rng.integers(0, 4, 30), rng.integers(0, 3, 30)  # label 3: predicted, never gold
    idx = rng.integers(0, 30, (200, 30))
    metric = macro_f1 if classification else accuracy
    expected = [metric(list(pred[i]), list(gold[i])) for i in idx]
    assert batch_metric(pred[idx], gold[idx], classification) == pytest.approx(expected, abs=1e-12)


def test_eval_reports_the_bootstrap_intervals(tmp_path):
    data, partition = _task_copy(tmp_path)
    for test in data.glob("*/*_test.jsonl"):  # 24 queries a set: enough for an interval
        test.write_text(test.read_text() * 2)
    recipe = _recipe("gpt2", tmp_path / "out", f"tasks.data_dir={data}", f"tasks.partition={partition}",
                     "eval.methods=[zero-shot, icl, mend]", "eval.bootstrap_samples=200")
    _with_distiller(recipe)
    console = _quiet()
    results = run_eval(recipe, console=console)
    b = results["bootstrap"]
    assert (b["samples"], b["seed"]) == (200, 0) and "tasks with replacement" in b["resampled"]
    scores = {m: a["score"] for m, a in results["aggregate"].items()}
    assert [(d["a"], d["b"]) for d in b["differences"]] == [("mend", "icl"), ("mend", "zero-shot")]
    for c in b["differences"]:
        assert c["estimate"] == pytest.approx(scores[c["a"]] - scores[c["b"]])
        assert c["low"] <= c["estimate"] <= c["high"]
    assert run_eval(recipe, console=_quiet())["bootstrap"] == b
    assert "mend - icl:" in console.file.getvalue() and "95% CI [" in (tmp_path / "out/eval/results.md").read_text()
    # 6 queries a set are too few: the estimate without an interval, and the table says why.
    console = _quiet()
    few = run_eval(recipe, limit=6, console=console)["bootstrap"]["differences"]
    assert all("low" not in d and "too few queries" in d["too_few"] for d in few)
    assert "95% CI n/a (too few queries: 6 < 20 per set)" in console.file.getvalue()
    assert "bootstrap" not in run_eval(_recipe("gpt2", tmp_path / "out", f"tasks.data_dir={data}",
                                               f"tasks.partition={partition}", "eval.bootstrap_samples=0"),
                                       limit=2, console=_quiet())
