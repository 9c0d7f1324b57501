"""Stage-1 text through `datasets` (pretrain.hf_dataset): a local folder laid out as C4's hub repository
(configuration `en`, gzipped JSON lines) read by the same call as a hub id, streamed, split 80/20."""
import gzip
import json
import sys

import pytest
from click.testing import CliRunner

from mendctl.cli import cli
from mendctl.core.config import RecipeError, load_recipe
from mendctl.data.metaicl import DataError
from mendctl.data.text import iter_hf

pytest.importorskip("datasets")  # the hf-data extra, which `make` installs

C4_CARD = """---
configs:
- config_name: en
  data_files:
  - split: train
    path: en/c4-train.*.json.gz
  - split: validation
    path: en/c4-validation.*.json.gz
---
"""


def doc(split, i):
    return f"{split} document {i}: " + " ".join(f"word{j}" for j in range(60))


@pytest.fixture
def c4(tmp_path):
    """A copy of allenai/c4's layout: en/c4-{split}.NNNNN-of-NNNNN.json.gz with text, timestamp and url."""
    root = tmp_path / "c4"
    (root / "en").mkdir(parents=True)
    (root / "README.md").write_text(C4_CARD)
    for split, n in (("train", 6), ("validation", 4)):
        for shard in range(2):
            with gzip.open(root / "en" / f"c4-{split}.{shard:05d}-of-00002.json.gz", "wt") as f:
                for i in range(shard * n, (shard + 1) * n):
                    f.write(json.dumps({"text": doc(split, i), "timestamp": "2019-04-25", "url": "u"}) + "\n")
    return root


def test_a_local_c4_layout_streams_its_configuration_and_split(c4):
    assert list(iter_hf(str(c4), "validation", "en")) == [doc("validation", i) for i in range(8)]
    assert next(iter_hf(str(c4), "train", "en")) == doc("train", 0)


@pytest.mark.parametrize("config, split, message", [("fr", "train", "'fr' not found"),
                                                     ("en", "test", "Bad split: test")])
def test_an_unknown_configuration_or_split_is_a_data_error_naming_it(c4, config, split, message):
    with pytest.raises(DataError, match=f"pretrain.hf_dataset '{c4}' \\(hf_config '{config}'\\).*{message}"):
        next(iter_hf(str(c4), split, config))


def test_rows_without_text_are_a_data_error_naming_the_fields(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(DataError, match='row 1 has no "text" field.*fields: content'):
        next(iter_hf(str(tmp_path / "d"), "train"))


def test_pretrain_splits_streamed_documents_80_20(c4, tiny):
    from mendctl.training.examples import TextExamples
    from mendctl.core.registry import get_backend

    recipe = tiny("gpt2", "pretrain.text=null", f"pretrain.hf_dataset={c4}", "pretrain.hf_config=en",
                  "pretrain.hf_split=validation")
    tok = get_backend("gpt2").build(recipe).llm_tokenizer
    source = TextExamples(recipe.pretrain, tok, 0, False)
    for position in range(3):
        ids = tok(doc("validation", position), add_special_tokens=False).input_ids[: recipe.pretrain.max_length]
        example = source.get(position)
        assert example.ctx == ids[: int(len(ids) * 0.8)] and example.y == ids[int(len(ids) * 0.8):]


def test_pretrain_trains_on_a_local_dataset_folder(c4, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["pretrain", "recipes/tiny/gpt2.yaml", f"output_dir={out}", "pretrain.text=null",
                                      f"pretrain.hf_dataset={c4}", "pretrain.hf_config=en", "pretrain.steps=2",
                                      "pretrain.save_every=2", "pretrain.batch_size=2"])
    assert result.exit_code == 0, result.output
    assert (out / "pretrain" / "distiller.safetensors").is_file()


def test_without_the_extra_pretrain_exits_2_with_the_pip_command(c4, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now fails as if it were not installed
    result = CliRunner().invoke(cli, ["pretrain", "recipes/tiny/gpt2.yaml", f"output_dir={tmp_path / 'run'}",
                                      "pretrain.text=null", f"pretrain.hf_dataset={c4}"])
    assert result.exit_code == 2
    assert "pip install 'mendctl[hf-data]'" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run" / "pretrain").exists()  # refused before any model loaded or any step ran


def test_the_recipe_checks_hf_keys(tmp_path):
    base = ["pretrain.text=null", f"output_dir={tmp_path}"]
    with pytest.raises(RecipeError, match="hf_config names a configuration of hf_dataset"):
        load_recipe("recipes/tiny/gpt2.yaml", ["pretrain.hf_config=en", f"output_dir={tmp_path}"])
    with pytest.raises(RecipeError, match="hf_dataset folder does not exist: .*nowhere"):
        load_recipe("recipes/tiny/gpt2.yaml", [*base, f"pretrain.hf_dataset={tmp_path}/nowhere"])
    assert load_recipe("recipes/tiny/gpt2.yaml", [*base, "pretrain.hf_dataset=allenai/c4"]).pretrain.hf_config is None
