"""A vectors file is bound to the LLM's weights, not only to its config: two tiny LLMs of one config and
different seeds do not read each other's vectors."""
import json

import pytest
from click.testing import CliRunner

from mendctl import load_vectors
from mendctl.cli import cli
from mendctl.core.provenance import weights_fingerprint
from mendctl.core.registry import get_backend
from mendctl.core.vectors import WEIGHTS_KEY, VectorsMismatch, read_metadata, save_vectors


def _build(tiny, *overrides):
    recipe = tiny("gpt2", *overrides)
    return recipe, get_backend(recipe.backend).build(recipe)


def _meta(recipe, models, **extra):
    return {"backend": recipe.backend, "llm_id": models.llm_id, "llm_config_hash": models.llm_config_hash,
            "distiller_hash": "abc", "task": "t", "seed": 1, "num_demos": 2, "demos_hash": "d",
            "template": {"input": "{input}", "output": " {output}", "separator": "\n"}, **extra}


def test_other_weights_of_the_same_config_are_refused_naming_both(tiny, tmp_path):
    recipe, models = _build(tiny)
    _, other = _build(tiny, "seed=1")
    assert other.llm_config_hash == models.llm_config_hash
    mine, theirs = weights_fingerprint(models.llm.model), weights_fingerprint(other.llm.model)
    assert mine != theirs
    path = tmp_path / "v.safetensors"
    save_vectors(path, models.llm.model.get_input_embeddings().weight[:recipe.num_vectors].detach(),
                 _meta(recipe, models, **{WEIGHTS_KEY: mine}))
    assert load_vectors(path, models.llm.model).metadata[WEIGHTS_KEY] == mine
    with pytest.raises(VectorsMismatch) as refused:
        load_vectors(path, other.llm.model)
    assert mine in str(refused.value) and theirs in str(refused.value)


def test_a_file_without_the_fingerprint_is_held_to_the_config_alone(tiny, tmp_path):
    recipe, models = _build(tiny)
    _, other = _build(tiny, "seed=1")
    path = tmp_path / "v.safetensors"
    save_vectors(path, other.llm.model.get_input_embeddings().weight[:recipe.num_vectors].detach(),
                 _meta(recipe, models))
    assert WEIGHTS_KEY not in read_metadata(path)
    load_vectors(path, other.llm.model)


def test_distill_records_the_fingerprint_and_eval_refuses_other_weights_with_exit_2(tmp_path):
    # Vectors fitted from the anchors need no trained distiller; eval, asked to use a distiller it does
    # not have, cannot make the sets again and refuses the files made for seed 0's weights.
    base = ["recipes/tiny/gpt2.yaml", f"output_dir={tmp_path}", "distiller.anchor=last"]
    fitted = ["distill.refine_from=anchors", "distill.refine_steps=1"]
    made = CliRunner().invoke(cli, ["distill", *base, *fitted])
    assert made.exit_code == 0, made.output
    files = sorted((tmp_path / "vectors").rglob("*.safetensors"))
    recorded = {read_metadata(f)[WEIGHTS_KEY] for f in files}
    assert len(files) > 1 and len(recorded) == 1
    refused = CliRunner().invoke(cli, ["eval", *base, "seed=1", "--limit", "2", "eval.methods=[mend]"])
    assert refused.exit_code == 2, refused.output
    message = " ".join(refused.output.split())
    assert recorded.pop() in message and "same config" in message
    # The same LLM reads them: seed 0 evaluates from the files, distilling nothing.
    again = CliRunner().invoke(cli, ["eval", *base, *fitted, "--limit", "2", "eval.methods=[mend]"])
    assert again.exit_code == 0, again.output
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert {s["source"] for row in results["vectors"].values() for s in row["sources"].values()} == {"file"}
