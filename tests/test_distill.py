"""`mendctl distill`: one vectors file per test task and seed, skipped when up to date."""
import json

import pytest
import torch
from click.testing import CliRunner

from mendctl import load_vectors
from mendctl.cli import cli
from mendctl.core.provenance import file_hash

TEST_TASKS, SEEDS = ("tiny_sentiment", "tiny_compare"), (100, 13)


@pytest.fixture
def trained(tmp_path):
    out = tmp_path / "run"
    base = ["recipes/tiny/gpt2.yaml", f"output_dir={out}"]
    result = CliRunner().invoke(cli, ["finetune", *base, "finetune.steps=2", "finetune.save_every=2"])
    assert result.exit_code == 0, result.output
    return base, out


def _files(out):
    return {(t, s): out / "vectors" / t / f"{s}.safetensors" for t in TEST_TASKS for s in SEEDS}


def test_writes_one_file_per_task_and_seed_with_its_metadata(trained):
    base, out = trained
    result = CliRunner().invoke(cli, ["distill", *base])
    assert result.exit_code == 0, result.output
    weights_hash = file_hash(out / "finetune" / "distiller.safetensors")
    for (task, seed), path in _files(out).items():
        vf = load_vectors(path)
        assert vf.vectors.shape == (4, 64)
        meta = vf.metadata
        assert (meta["task"], meta["seed"], meta["num_demos"]) == (task, str(seed), "4")
        assert meta["distiller_hash"] == weights_hash and meta["backend"] == "gpt2"
        assert json.loads(meta["template"])["separator"] == "\n"


def test_second_run_skips_up_to_date_files_and_force_rewrites(trained):
    base, out = trained
    CliRunner().invoke(cli, ["distill", *base])
    before = {k: p.stat().st_mtime_ns for k, p in _files(out).items()}
    again = CliRunner().invoke(cli, ["distill", *base])
    assert "4 vectors file(s) already up to date" in again.output
    assert {k: p.stat().st_mtime_ns for k, p in _files(out).items()} == before
    forced = CliRunner().invoke(cli, ["distill", *base, "--force"])
    assert forced.exit_code == 0
    assert all(p.stat().st_mtime_ns != before[k] for k, p in _files(out).items())


def test_other_demonstration_rendering_makes_files_stale(trained):
    base, out = trained
    CliRunner().invoke(cli, ["distill", *base])
    changed = CliRunner().invoke(cli, ["distill", *base, "template.separator=' | '"])
    assert "already up to date" not in changed.output
    assert json.loads(load_vectors(_files(out)[("tiny_compare", 13)]).metadata["template"])["separator"] == " | "


def test_batch_size_does_not_change_the_vectors(trained):
    base, out = trained
    CliRunner().invoke(cli, ["distill", *base, "distill.batch_size=1"])
    one = {k: load_vectors(p).vectors for k, p in _files(out).items()}
    CliRunner().invoke(cli, ["distill", *base, "distill.batch_size=4", "--force"])
    for k, p in _files(out).items():
        torch.testing.assert_close(load_vectors(p).vectors, one[k], atol=1e-5, rtol=1e-5)


def test_without_a_trained_distiller_it_says_what_to_run(tmp_path):
    result = CliRunner().invoke(cli, ["distill", "recipes/tiny/gpt2.yaml", f"output_dir={tmp_path}"])
    assert result.exit_code == 2
    assert "run `mendctl pretrain` and/or `mendctl finetune` first" in result.output


def test_a_damaged_vectors_file_is_refused_then_distilled_again(trained):
    from mendctl.core.vectors import VectorsMismatch

    base, out = trained
    CliRunner().invoke(cli, ["distill", *base])
    damaged = _files(out)[("tiny_sentiment", 100)]
    damaged.write_bytes(damaged.read_bytes()[:40])  # a copy cut short
    with pytest.raises(VectorsMismatch, match="not a readable safetensors file"):
        load_vectors(damaged)
    evaluated = CliRunner().invoke(cli, ["eval", *base, "--limit", "2", "eval.methods=[mend]"])
    assert evaluated.exit_code == 0, evaluated.output
    sources = json.loads((out / "eval" / "results.json").read_text())["vectors"]["mend"]["sources"]
    assert sources["tiny_sentiment/100"]["source"] == "distilled"
    assert "not a readable safetensors file" in sources["tiny_sentiment/100"]["reason"]
    assert [k for k, v in sources.items() if v["source"] == "file"] == ["tiny_sentiment/13", "tiny_compare/100",
                                                                        "tiny_compare/13"]
    again = CliRunner().invoke(cli, ["distill", *base])
    assert "3 vectors file(s) already up to date" in again.output
    assert load_vectors(damaged).vectors.shape == (4, 64)
