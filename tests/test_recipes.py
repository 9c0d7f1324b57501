import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from mendctl.cli import cli
from mendctl.core.config import DistillerSpec, RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[1]

SHIPPED = sorted((ROOT / "recipes").rglob("*.yaml"))


def test_some_recipes_are_shipped():
    assert {p.name for p in SHIPPED} >= {"gpt2.yaml", "t5.yaml", "llama.yaml"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_recipe_is_valid_and_documents_its_command(path):
    recipe = load_recipe(path)
    first = path.read_text().splitlines()[:8]
    assert first[0].startswith("#")
    assert any("mendctl" in line and str(path.relative_to(ROOT)) in line for line in first), \
        "a recipe's header comment gives the exact command to run it"
    assert recipe.num_vectors >= 1


def _shipped_weights():
    """(recipe, key, file) for each distiller file under data/distillers that a shipped recipe names."""
    out = []
    for path in SHIPPED:
        recipe = load_recipe(path)
        for key, value in (("distill.checkpoint", recipe.distill and recipe.distill.checkpoint),
                           ("finetune.init_from", recipe.finetune and recipe.finetune.init_from)):
            if value is not None and "data/distillers" in str(value):
                out.append((path, key, Path(value)))
    return out


@pytest.mark.parametrize("path,key,weights", _shipped_weights(), ids=lambda v: str(v).rsplit("/", 1)[-1])
def test_shipped_distillers_are_small_and_carry_the_recipe_that_loads_them(path, key, weights):
    from safetensors import safe_open

    assert weights.stat().st_size <= 25 * 2**20  # adapters, placeholders and correction only
    with safe_open(str(weights), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "mendctl-distiller" and "versions" in json.loads(meta["provenance"])
    trained = json.loads(meta["recipe"])
    shipped = load_recipe(path).model_dump(mode="json")
    # the distiller is built from the loading recipe: its section must be the one the weights were trained with
    # (keys added since, read with their defaults, which build the distiller as it was)
    assert DistillerSpec.model_validate(trained["distiller"]).model_dump(mode="json") == shipped["distiller"], \
        f"{path.name} {key}"
    assert trained["llm"] == shipped["llm"] and trained["num_vectors"] == shipped["num_vectors"]


def test_the_shipped_weights_are_found():
    shipped = {w.name for _, _, w in _shipped_weights()}
    assert shipped == {"smollm2-bench.safetensors"} == {p.name for p in (ROOT / "data" / "distillers").iterdir()}


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


BASE = """backend: gpt2
output_dir: {out}
num_vectors: 4
llm:
  random_init: {{layers: 1, hidden: 16, heads: 2}}
distiller:
  random_init: {{layers: 1, hidden: 16, heads: 2}}
"""


def test_unknown_key_is_an_error_with_its_path_and_line(tmp_path):
    p = write(tmp_path, BASE.format(out=tmp_path) + "finetune:\n  steps: 3\n  lrr: 0.1\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    (loc, key, msg), = e.value.problems
    assert key == "finetune.lrr" and "Extra inputs" in msg
    assert loc == f"{p}:10"


def test_wrong_type_names_the_key(tmp_path):
    p = write(tmp_path, BASE.format(out=tmp_path) + "finetune:\n  steps: 3\n  lr: fast\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    assert [(k, m) for _, k, m in e.value.problems] == [("finetune.lr", "Input should be a valid number, unable to parse string as a number")]


def test_missing_file_names_the_key(tmp_path):
    p = write(tmp_path, BASE.format(out=tmp_path) + "pretrain:\n  steps: 3\n  text: [nowhere/at/all.txt]\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    (loc, key, msg), = e.value.problems
    assert key == "pretrain.text[0]" and msg == "path does not exist: nowhere/at/all.txt"
    assert loc == f"{p}:10"


def test_all_errors_are_reported_at_once(tmp_path):
    p = write(tmp_path, BASE.format(out=tmp_path).replace("num_vectors: 4", "num_vectors: 0")
              + "colour: red\nfinetune:\n  steps: -1\n  lr: fast\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    keys = {k for _, k, _ in e.value.problems}
    assert keys == {"num_vectors", "colour", "finetune.steps", "finetune.lr"}


def test_unknown_backend_suggests_the_close_one(tmp_path):
    p = write(tmp_path, BASE.format(out=tmp_path).replace("backend: gpt2", "backend: gtp2"))
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    assert "Did you mean 'gpt2'" in str(e.value)


def test_overrides_apply_before_validation_and_are_blamed_on_the_command_line(tmp_path):
    p = write(tmp_path, BASE.format(out=tmp_path) + "finetune:\n  steps: 3\n")
    r = load_recipe(p, ["finetune.steps=10", "output_dir=/tmp/x", "finetune.trackers=[tensorboard]"])
    assert r.finetune.steps == 10 and str(r.output_dir) == "/tmp/x" and r.finetune.trackers == ["tensorboard"]
    with pytest.raises(RecipeError) as e:
        load_recipe(p, ["finetune.lr=abc"])
    assert e.value.problems[0][0] == "command line"


def test_cli_validate_exits_2_without_traceback(tmp_path):
    p = write(tmp_path, BASE.format(out=tmp_path) + "colour: red\n")
    result = CliRunner().invoke(cli, ["validate", str(p)])
    assert result.exit_code == 2
    assert "colour" in result.output and "Traceback" not in result.output


def test_cli_ls_lists_backends_recipes_and_partitions():
    result = CliRunner().invoke(cli, ["ls"])
    assert result.exit_code == 0, result.output
    for word in ("gpt2", "t5", "llama", "tiny/gpt2", "class_to_class"):
        assert word in result.output


def test_cli_data_bigbench_converts_a_folder_and_checks_its_arguments(tmp_path):
    import json

    src = tmp_path / "bb" / "yesno"
    src.mkdir(parents=True)
    examples = [{"input": f"question {i}", "target_scores": {"yes": i % 2, "no": 1 - i % 2}} for i in range(40)]
    (src / "task.json").write_text(json.dumps({"examples": examples}))
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["data", "bigbench", str(tmp_path / "bb"), str(out), "--k", "4"])
    assert result.exit_code == 0, result.output
    assert (out / "yesno" / "yesno_4_100_train.jsonl").is_file()
    for bad in (["data", "bigbench", str(out)], ["data", "bigbench", "--fetch", "a", "b"]):
        result = CliRunner().invoke(cli, bad)
        assert result.exit_code == 2 and "give SRC and OUT, or --fetch and OUT" in result.output
