"""The Python API (docs/api.md): distil a user's demonstrations, answer queries after them as eval
would, generate after the vectors, on the tiny gpt2, llama and t5 models."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from mendctl import Mend, Vectors, apply
from mendctl.core.config import load_recipe
from mendctl.data.metaicl import DataError, load_split
from mendctl.core.vectors import VectorsMismatch

ROOT = Path(__file__).resolve().parents[1]
DEMOS = [{"input": "good", "output": "yes", "options": ["yes", "no"]},
         {"input": "bad", "output": "no", "options": ["yes", "no"]},
         {"input": "fine", "output": "yes"}]


@pytest.fixture(scope="module")
def mends(tmp_path_factory):
    out = tmp_path_factory.mktemp("mend")
    return {b: Mend.from_recipe(ROOT / "recipes" / "tiny" / f"{b}.yaml", [f"output_dir={out / b}"])
            for b in ("gpt2", "llama", "t5")}


def test_the_docs_example_runs(tmp_path, capsys):
    code = re.search(r"```python\n(.*?)```", (ROOT / "docs" / "api.md").read_text(), re.S).group(1)
    exec(code.replace("runs/api-example", str(tmp_path / "api-example")), {})
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("1 ") and ("positive" in printed[0] or "negative" in printed[0])
    assert printed[1].startswith("2 None None ")
    assert (tmp_path / "api-example" / "reviews.safetensors").is_file()


def test_distill_refuses_an_untrained_distiller_unless_allowed(mends):
    with pytest.raises(FileNotFoundError, match="no trained distiller"):
        mends["gpt2"].distill(DEMOS)
    vectors = mends["gpt2"].distill(DEMOS, name="mine", untrained=True)
    assert vectors.tensor.shape == (4, 64) and vectors.name == "mine"
    assert vectors.metadata["distiller_hash"] == "untrained" and vectors.metadata["num_demos"] == "3"
    assert vectors.metadata["method"] == "mend"  # as `mendctl distill` records it: eval and predict read it


def test_distilled_vectors_record_how_they_were_made(tmp_path):
    """refine_* keys make the method distill records: fitted from the anchors (no distiller ran), mend+fit
    after steps from the distiller."""
    recipe = ROOT / "recipes" / "tiny" / "gpt2.yaml"
    fitted = Mend.from_recipe(recipe, [f"output_dir={tmp_path}", "distiller.anchor=last", "distill.refine_from=anchors",
                                       "distill.refine_steps=1"]).distill(DEMOS)
    assert fitted.metadata["method"] == "fitted" and fitted.metadata["distiller_hash"] == "untrained"
    refined = Mend.from_recipe(recipe, [f"output_dir={tmp_path}", "distill.refine_steps=1"]).distill(
        DEMOS, untrained=True)
    assert refined.metadata["method"] == "mend+fit" and refined.metadata["refine_steps"] == "1"


def test_vectors_round_trip_and_refuse_another_llm(mends, tmp_path):
    vectors = mends["llama"].distill(DEMOS, name="mine", untrained=True)
    vectors.save(tmp_path / "v.safetensors")
    back = Vectors.load(tmp_path / "v.safetensors", mends["llama"])
    assert torch.equal(back.tensor, vectors.tensor) and back.metadata == vectors.metadata
    with pytest.raises(VectorsMismatch, match="not for the LLM in use"):
        Vectors.load(tmp_path / "v.safetensors", mends["gpt2"])
    with pytest.raises(VectorsMismatch):
        mends["gpt2"].predict(back, [{"input": "x", "options": ["a", "b"]}])


@pytest.mark.parametrize("backend", ["gpt2", "llama", "t5"])
def test_predict_keeps_fields_scores_options_and_generates(mends, backend):
    mend = mends[backend]
    vectors = mend.distill(DEMOS, untrained=True)
    queries = [{"id": 7, "input": "good", "options": ["yes", "no"]}, {"id": 8, "input": "tell me", "extra": [1]}]
    for method in ("mend", "icl", "zero-shot"):
        rows = mend.predict(vectors, queries, method=method, demos=DEMOS, max_new_tokens=4)
        assert [r["id"] for r in rows] == [7, 8] and rows[1]["extra"] == [1]
        assert rows[0]["prediction"] in ("yes", "no") and set(rows[0]["probs"]) == {"yes", "no"}
        assert sum(rows[0]["probs"].values()) == pytest.approx(1.0)
        assert rows[0]["prediction"] == max(rows[0]["probs"], key=rows[0]["probs"].get)
        assert isinstance(rows[1]["generated"], str) and "prediction" not in rows[1]
    assert "generated" not in queries[1]  # the caller's rows are not written into


@pytest.mark.parametrize("backend", ["gpt2", "llama", "t5"])
def test_generation_is_greedy_and_batching_changes_nothing(mends, backend):
    mend = mends[backend]
    vectors = mend.distill(DEMOS, untrained=True)
    prompts = ["a", "a longer prompt than the first"]
    together = mend.engine.generate(mend._prefix(vectors), [mend._rendered(mend._prefix(vectors), {"input": p}, []).x
                                                            for p in prompts], max_new_tokens=6)
    alone = [mend.engine.generate(mend._prefix(vectors), [mend._rendered(mend._prefix(vectors), {"input": p}, []).x],
                                  max_new_tokens=6)[0] for p in prompts]
    assert together == alone and all(together)
    # Each generated token is the argmax after the prefix, the prompt and the tokens before it: the
    # scoring path (target_logits) agrees that greedy decoding gives exactly this continuation.
    prefix = mend._prefix(vectors)
    xs = [mend._rendered(prefix, {"input": p}, []).x for p in prompts]
    assert all(greedy for _, greedy in mend.engine.continuation_logprobs(prefix, xs, together))
    texts = mend.generate(vectors, prompts, max_new_tokens=6)
    assert texts == [mend.tokenizer.decode(ids, skip_special_tokens=True) for ids in together]


def test_loglikelihood_sums_the_continuations_tokens(mends):
    mend = mends["gpt2"]
    vectors = mend.distill(DEMOS, untrained=True)
    (whole, _), = mend.loglikelihood(vectors, ["good"], [" yes"])
    # A one-token-per-byte tokenizer: the sum over " yes" is the sum of its four tokens' log-probs,
    # read one at a time with the earlier ones moved into the context.
    parts = mend.loglikelihood(vectors, ["good", "good ", "good y"], [" ", "y", "e"])
    (last, _), = mend.loglikelihood(vectors, ["good ye"], ["s"])
    assert whole == pytest.approx(sum(p for p, _ in parts) + last, abs=1e-4)
    assert mend.loglikelihood(None, [""], ["x"])[0][0] < 0  # no context: read after EOS, as lm-eval does


def test_predict_chooses_what_eval_chooses(tmp_path):
    """Vectors distilled through the API, saved where eval looks, then eval's table and predict agree
    on every query, for mend, icl and zero-shot."""
    from mendctl.commands.eval import run_eval
    from mendctl.data.workspace import vectors_path

    recipe = load_recipe(ROOT / "recipes" / "tiny" / "gpt2.yaml",
                         [f"output_dir={tmp_path}", "tasks.seeds=[100]", "eval.methods=[zero-shot,icl,mend]",
                          "eval.bootstrap_samples=0", "eval.cache=false"])
    mend = Mend.from_recipe(recipe)
    data, k = recipe.tasks.data_dir, recipe.tasks.k
    tasks = ["tiny_sentiment", "tiny_compare"]
    demos = {t: load_split(data, t, k, 100, "train") for t in tasks}
    for t in tasks:
        mend.distill(demos[t], name=t, untrained=True).save(vectors_path(recipe, t, 100))
    results = run_eval(recipe, limit=6)
    for t in tasks:
        queries = load_split(data, t, k, 100, "test")[:6]
        vectors = Vectors.load(vectors_path(recipe, t, 100), mend)
        scored = results["tasks"][t]["seeds"]["100"]["methods"]
        for method in ("mend", "icl", "zero-shot"):
            rows = mend.predict(vectors, queries, method=method, demos=demos[t])
            eval_choice = [q["options"][i] for q, i in zip(queries, scored[method]["predictions"])]
            assert [r["prediction"] for r in rows] == eval_choice, (t, method)
        source = results["vectors"]["mend"]["sources"][f"{t}/100"]
        assert source["source"] == "file" and source["method"] == "mend"  # the row distill's own files make


def test_apply_is_predict_on_one_query(mends, tmp_path):
    mend = mends["gpt2"]
    vectors = mend.distill(DEMOS, untrained=True)
    vectors.save(tmp_path / "v.safetensors")
    got = apply(mend.llm, mend.tokenizer, tmp_path / "v.safetensors", "good", ["yes", "no"])
    row, = mend.predict(vectors, [{"input": "good", "options": ["yes", "no"]}])
    assert got["prediction"] == row["prediction"]
    scores = mend.score_options(vectors, ["good"], [["yes", "no"]])[0]
    assert list(got["losses"].values()) == pytest.approx([-s for s in scores])


@pytest.mark.parametrize("call, message", [
    (lambda m, v: m.predict(v, [{"input": "x"}], method="icl"), "needs demonstrations"),
    (lambda m, v: m.predict(v, [{"input": "x"}], method="few-shot"), "unknown method"),
    (lambda m, v: m.predict(None, [{"input": "x"}]), "method mend needs vectors"),
    (lambda m, v: m.predict(v, [{"text": "x"}]), r"queries\[0\]: missing field input"),
    (lambda m, v: m.predict(v, [{"input": "x", "options": []}]), "non-empty list"),
    (lambda m, v: m.predict(v, []), "no queries"),
    (lambda m, v: m.distill([{"input": "x"}], untrained=True), r"demos\[0\]: missing field output"),
    (lambda m, v: m.distill([{"input": "x", "output": "z", "options": ["a"]}], untrained=True), "not among"),
    (lambda m, v: m.distill(DEMOS, name="../up", untrained=True), "task name"),
])
def test_bad_calls_name_what_is_wrong(mends, call, message):
    mend = mends["gpt2"]
    vectors = mend.distill(DEMOS, untrained=True)
    with pytest.raises((ValueError, DataError), match=message):
        call(mend, vectors)
