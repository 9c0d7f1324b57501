"""`mendctl distill --demos` and `mendctl predict` as a user runs them: in a folder of their own,
outside the repository, with a shipped recipe and no task data or partition."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from mendctl import Vectors
from mendctl.cli import cli

DEMOS = [{"input": "a delight", "output": "positive", "options": ["positive", "negative"]},
         {"input": "a bore", "output": "negative", "options": ["positive", "negative"]}]
QUERIES = [{"id": "q1", "input": "a joy", "options": ["positive", "negative"], "source": "mine"},
           {"id": "q2", "input": "in one line:"}]


def mendctl(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mendctl", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_distill_then_predict_in_a_folder_outside_the_repository(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "reviews.jsonl", DEMOS)
    write_jsonl(tmp_path / "queries.jsonl", QUERIES)
    monkeypatch.chdir(tmp_path)
    assert CliRunner().invoke(cli, ["cp", "tiny/gpt2", "gpt2.yaml"]).exit_code == 0

    made = mendctl(tmp_path, "distill", "gpt2.yaml", "--demos", "reviews.jsonl", "--out", "reviews.safetensors",
                   "--untrained")
    assert made.returncode == 0, made.stderr
    vectors = Vectors.load(tmp_path / "reviews.safetensors")
    assert vectors.name == "reviews" and vectors.tensor.shape == (4, 64)  # the task name: the file's stem
    assert vectors.metadata["num_demos"] == "2" and vectors.metadata["distiller_hash"] == "untrained"
    assert vectors.metadata["method"] == "mend"

    answered = {}
    for method, extra in (("mend", ["--vectors", "reviews.safetensors"]), ("icl", ["--demos", "reviews.jsonl"]),
                          ("zero-shot", [])):
        # A process of its own for mend, as a user runs it; the others in this one (a start costs seconds).
        args = ["predict", "gpt2.yaml", "--queries", "queries.jsonl", "--out", f"{method}.jsonl", "--method", method,
                "--max-new-tokens", "5", *extra]
        if method == "mend":
            run = mendctl(tmp_path, *args)
            assert run.returncode == 0, run.stderr
        else:
            run = CliRunner().invoke(cli, args)
            assert run.exit_code == 0, run.output
        rows = [json.loads(line) for line in (tmp_path / f"{method}.jsonl").read_text().splitlines()]
        assert [(r["id"], r.get("source")) for r in rows] == [("q1", "mine"), ("q2", None)]
        assert rows[0]["prediction"] in ("positive", "negative") and set(rows[0]["probs"]) == {"positive", "negative"}
        assert "generated" in rows[1] and "prediction" not in rows[1]
        meta = json.loads((tmp_path / f"{method}.jsonl.meta.json").read_text())
        assert meta["method"] == method and meta["provenance"]["versions"]["mendctl"]
        answered[method] = rows
    made = json.loads((tmp_path / "mend.jsonl.meta.json").read_text())["vectors"]
    assert made["task"] == "reviews" and made["method"] == "mend"

    # Like cp: an existing output is kept unless --force.
    again = CliRunner().invoke(cli, ["predict", "gpt2.yaml", "--queries", "queries.jsonl", "--out", "zero-shot.jsonl",
                                     "--method", "zero-shot"])
    assert again.exit_code == 2 and "exists: pass --force" in again.output
    forced = CliRunner().invoke(cli, ["predict", "gpt2.yaml", "--queries", "queries.jsonl", "--out", "zero-shot.jsonl",
                                      "--method", "zero-shot", "--max-new-tokens", "5", "--force"])
    assert forced.exit_code == 0, forced.output
    assert [json.loads(line) for line in (tmp_path / "zero-shot.jsonl").read_text().splitlines()] == answered["zero-shot"]
    # Nothing but what was asked for: no task data, no run folder.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([
        "gpt2.yaml", "reviews.jsonl", "queries.jsonl", "reviews.safetensors",
        *(f"{m}.jsonl" for m in answered), *(f"{m}.jsonl.meta.json" for m in answered)])
