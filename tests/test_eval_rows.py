"""Eval's rows for vectors made in different ways, side by side, and a table that does not mislead:
rows named by how the vectors were made, partial runs flagged, cached baselines timed again, 80 columns."""
import io
import json
from pathlib import Path

import pytest
from rich.console import Console
from rich.measure import Measurement
from safetensors import safe_open
from safetensors.torch import save_file

from mendctl.evaluation import report
from mendctl.training.checkpoint import save_distiller
from mendctl.core.config import load_recipe
from mendctl.commands.distill import run_distill
from mendctl.commands.eval import run_eval
from mendctl.training.trained import UNTRAINED, load_trained
from mendctl.core.vectors import read_metadata
from mendctl.data.workspace import missing_task_files

TINY = Path(__file__).resolve().parent.parent / "recipes" / "tiny"
# The distill section (the trained distiller, no steps), the same then 2 steps, and 2 steps from the anchors.
THREE = ["distiller.anchor=last", "distill.variants=[{refine_steps: 2}, {refine_from: anchors, refine_steps: 2}]"]


def _recipe(out: Path, *overrides: str):
    return load_recipe(TINY / "gpt2.yaml", [f"output_dir={out}", *overrides])


def _quiet(width: int = 200) -> Console:
    return Console(file=io.StringIO(), width=width)


def _with_distiller(recipe) -> None:
    models, _ = load_trained(recipe, require=False)
    save_distiller(recipe.stage_dir("finetune"), models.distiller, recipe, {})


@pytest.fixture(scope="module")
def three_rows(tmp_path_factory):
    """A run of every method with the three kinds of vectors, from files: (recipe, results, what it printed)."""
    out = tmp_path_factory.mktemp("three")
    recipe = _recipe(out, *THREE)
    _with_distiller(recipe)
    run_distill(recipe, console=_quiet())
    console = _quiet()
    return recipe, run_eval(recipe, limit=3, console=console), console.file.getvalue()


def test_distill_makes_a_folder_per_variant_recording_how_its_vectors_were_made(three_rows):
    recipe, _, _ = three_rows
    made = {"vectors": ("mend", False), "vectors-refine_steps=2": ("mend+fit", False),
            "vectors-refine_from=anchors,refine_steps=2": ("fitted", True)}
    for folder, (method, untrained) in made.items():
        files = sorted((recipe.output_dir / folder).glob("*/*.safetensors"))
        assert len(files) == 4  # 2 tasks x 2 seeds
        for f in files:
            meta = read_metadata(f)
            assert meta["method"] == method and (meta["distiller_hash"] == UNTRAINED) == untrained


def test_eval_scores_each_folder_as_a_row_named_by_its_method(three_rows):
    recipe, results, printed = three_rows
    assert results["methods"] == ["zero-shot", "icl", "icl-truncated", "mend", "mend+fit@2", "fitted@2", "llmlingua"]
    agg = results["aggregate"]
    # One-off FLOPs per set: the distiller's pass, that pass plus 2 steps, the 2 steps alone.
    mend, refined, fitted = (agg[r]["distill_flops_per_set"] for r in ("mend", "mend+fit@2", "fitted@2"))
    assert 0 < mend < refined and fitted == pytest.approx(refined - mend, rel=1e-9)
    rows = results["vectors"]
    assert {r: (v["method"], v["refine_steps"]) for r, v in rows.items()} == {
        "mend": ("mend", 0), "mend+fit@2": ("mend+fit", 2), "fitted@2": ("fitted", 2)}
    assert all(s["source"] == "file" for v in rows.values() for s in v["sources"].values())
    assert rows["fitted@2"]["dir"] == str(recipe.output_dir / "vectors-refine_from=anchors,refine_steps=2")
    assert set(results["vs_icl"]) == {"mend", "mend+fit@2", "fitted@2"}
    pairs = [(d["a"], d["b"]) for d in results["bootstrap"]["differences"]]
    assert ("mend+fit@2", "fitted@2") in pairs and ("mend", "icl") in pairs and ("fitted@2", "zero-shot") in pairs
    for row in ("mend+fit@2", "fitted@2"):
        assert f"\n{row} " in printed


def test_fitted_vectors_are_never_labelled_mend(tmp_path):
    # The section itself fits from the anchors: whatever eval.methods calls it, the row says fitted.
    recipe = _recipe(tmp_path, "distiller.anchor=last", "distill.refine_from=anchors", "distill.refine_steps=1",
                     "eval.methods=[icl, mend]")
    run_distill(recipe, console=_quiet())
    results = run_eval(recipe, limit=2, console=_quiet())
    assert list(results["aggregate"]) == ["icl", "fitted@1"] and "mend" not in results["vs_icl"]


def test_a_file_made_before_the_method_was_recorded_gets_it_from_its_refinement(tmp_path):
    recipe = _recipe(tmp_path, "distiller.anchor=last", "distill.refine_from=anchors", "distill.refine_steps=1",
                     "eval.methods=[mend]")
    files = run_distill(recipe, console=_quiet())
    for f in files:
        with safe_open(str(f), framework="pt") as opened:
            meta, tensor = opened.metadata(), opened.get_tensor("vectors")
        del meta["method"]
        save_file({"vectors": tensor}, str(f), metadata=meta)
    console = _quiet()
    run_distill(recipe, console=console)  # still up to date: nothing to remake
    assert "4 vectors file(s) already up to date in vectors" in console.file.getvalue()
    assert "method" not in read_metadata(files[0])
    assert list(run_eval(recipe, limit=2, console=_quiet())["aggregate"]) == ["fitted@1"]


def test_the_table_fits_80_columns_without_cutting_a_header(three_rows):
    _, results, _ = three_rows
    console = Console(file=io.StringIO(), width=80, record=True)
    table = report.table(results)
    assert Measurement.get(console, console.options, table).maximum <= 80
    console.print(table)
    text = console.export_text()
    header = next(line for line in text.splitlines() if line.startswith("method"))
    assert header.split() == list(report.SHORT)
    assert "…" not in text and all(len(line) <= 80 for line in text.splitlines())
    for row in results["aggregate"]:
        assert any(line.split()[:1] == [row] for line in text.splitlines())


def test_a_console_too_narrow_gets_one_block_per_method(three_rows, tmp_path):
    _, results, _ = three_rows
    console = Console(file=io.StringIO(), width=50)
    report.write(results, tmp_path, console)
    printed = console.file.getvalue()
    assert "\nfitted@2\n  qual%: " in printed and "…" not in printed


def test_a_partial_run_says_so(three_rows, tmp_path):
    _, partial, printed = three_rows  # --limit 3 of 12 queries a set
    assert partial["partial"] is True and partial["queries"] == {"scored": 12, "available": 48}
    assert "PARTIAL: 12 of the 48 test queries scored (--limit)" in printed
    whole = run_eval(_recipe(tmp_path, "eval.methods=[zero-shot]"), console=_quiet())
    assert whole["partial"] is False and "partial_reason" not in whole
    assert "PARTIAL" not in (tmp_path / "eval" / "results.md").read_text()


def test_cached_baselines_are_timed_again_on_a_sample(tmp_path, monkeypatch):
    import mendctl.commands.eval as evaluate

    base = ["eval.methods=[zero-shot, icl]"]
    first = run_eval(_recipe(tmp_path, *base), limit=5, console=_quiet())
    assert first["aggregate"]["icl"]["timed_queries"] == 20  # 4 sets x 5 queries, scored and timed now
    calls, real = [], evaluate.score
    monkeypatch.setattr(evaluate, "score", lambda llm, prefix, qs, *a, **k: calls.append(len(qs.queries))
                        or real(llm, prefix, qs, *a, **k))
    console = _quiet()
    second = run_eval(_recipe(tmp_path, *base, "eval.retime_queries=2"), limit=5, console=console)
    assert calls == [2] * 8  # two methods on 4 sets: 2 queries each, timed; their scores from the cache
    for m in ("zero-shot", "icl"):
        a = second["aggregate"][m]
        assert a["from_cache"] and a["timed_queries"] == 8 and a["score"] == first["aggregate"][m]["score"]
    assert "*: scores from the baseline cache; latency (and GPU memory) timed in this run on a sample of queries " \
           "(zero-shot 8, icl 8)" in console.file.getvalue()


def test_validation_files_of_every_set_the_curves_score_are_needed(tmp_path):
    recipe = _recipe(tmp_path, "tasks.validation=[tiny_color]", "tasks.seeds=[100,13]", "finetune.eval_sets=2")
    needed = {p.name for p in missing_task_files(recipe) if p.parent.name == "tiny_color"}
    assert {"tiny_color_4_100_test.jsonl", "tiny_color_4_13_train.jsonl", "tiny_color_4_13_test.jsonl"} <= needed
