"""lm-evaluation-harness with distilled vectors: the `mend` model through simple_evaluate and through
`mendctl lm-eval`, on a tiny model and small local tasks (lm-eval's `json` dataset path)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

ROOT = Path(__file__).resolve().parents[1]
GPT2 = ROOT / "recipes" / "tiny" / "gpt2.yaml"
DEMOS = [{"input": "a delight from start to end", "output": "positive"},
         {"input": "two hours I will not get back", "output": "negative"},
         {"input": "the cast is superb", "output": "positive"}]
ROWS = [("a joy to watch", 0), ("dull and slow", 1), ("superb acting", 0), ("I left early", 1)]

TASKS = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: {output_type}
doc_to_text: "Review: {{{{input}}}}\\nSentiment:"
{rest}
"""
MC = """\
doc_to_choice: "{{options}}"
doc_to_target: label
metric_list:
  - metric: acc
"""
GEN = """\
doc_to_target: "{{options[label]}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Mend, vectors of its demonstrations in a file, and two local tasks in an include folder."""
    from mendctl.api.mend import Mend

    tmp = tmp_path_factory.mktemp("lm_eval")
    data = tmp / "reviews.jsonl"
    data.write_text("".join(json.dumps({"input": i, "options": [" positive", " negative"], "label": label}) + "\n"
                            for i, label in ROWS))
    tasks = tmp / "tasks"
    tasks.mkdir()
    for name, kind, rest in [("tiny_reviews_mc", "multiple_choice", MC), ("tiny_reviews_gen", "generate_until", GEN)]:
        (tasks / f"{name}.yaml").write_text(TASKS.format(name=name, data=data, output_type=kind, rest=rest))
    mend = Mend.from_recipe(GPT2, [f"output_dir={tmp / 'out'}"])
    vectors = mend.distill(DEMOS, name="reviews", untrained=True)
    vectors.save(tmp / "reviews.safetensors")
    return mend, vectors, tmp


@pytest.fixture(autouse=True)
def _offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))


def test_simple_evaluate_scores_with_the_vectors(setup):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from mendctl.commands.lm_eval import MendLM

    mend, vectors, tmp = setup
    model = MendLM(mend=mend, vectors=vectors, batch_size=3)
    out = lm_eval.simple_evaluate(model=model, tasks=["tiny_reviews_mc", "tiny_reviews_gen"],
                                  task_manager=TaskManager(include_path=str(tmp / "tasks")), log_samples=True)
    assert 0.0 <= out["results"]["tiny_reviews_mc"]["acc,none"] <= 1.0
    samples = out["samples"]["tiny_reviews_mc"]
    assert len(samples) == len(ROWS)
    for sample in samples:  # each option's log-likelihood is Mend's, after the vectors
        contexts, continuations = zip(*sample["arguments"])
        want = mend.loglikelihood(vectors, list(contexts), list(continuations))
        assert [r[0] for r in sample["resps"]] == [[w[0], w[1]] for w in want] or \
            [tuple(r[0]) for r in sample["resps"]] == want
    for sample in out["samples"]["tiny_reviews_gen"]:
        context = sample["arguments"][0][0]
        text = mend.generate(vectors, [context], raw=True, max_new_tokens=4)[0].split("\n")[0]
        assert sample["resps"][0][0] == text


def test_the_model_is_registered_as_mend(setup):
    from lm_eval.api.registry import get_model

    from mendctl.commands.lm_eval import MendLM

    assert get_model("mend") is MendLM
    mend, vectors, _ = setup
    with pytest.raises(NotImplementedError, match="perplexity task"):
        MendLM(mend=mend, vectors=vectors).loglikelihood_rolling([])


@pytest.mark.slow
def test_mendctl_lm_eval_runs_lm_evals_own_command_line(setup, tmp_path):
    _, _, tmp = setup
    out = tmp_path / "results"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "datasets")}
    r = subprocess.run([sys.executable, "-m", "mendctl", "lm-eval", str(GPT2), f"output_dir={tmp / 'out'}",
                        "--vectors", str(tmp / "reviews.safetensors"), "--tasks", "tiny_reviews_mc",
                        "--include_path", str(tmp / "tasks"), "--limit", "2", "--output_path", str(out)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = list(out.rglob("results_*.json"))
    assert len(results) == 1, list(out.rglob("*"))
    got = json.loads(results[0].read_text())
    assert got["config"]["model"] == "mend" and "acc,none" in got["results"]["tiny_reviews_mc"]
    assert got["n-samples"]["tiny_reviews_mc"]["effective"] == 2
