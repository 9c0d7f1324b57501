"""The paper's setups as shipped recipes: validated without loading a model, with the paper's settings,
for each of MetaICL's seven partitions, with the override their headers give."""
import shlex
from pathlib import Path

import pytest

from mendctl.core.config import load_recipe
from mendctl.core.partitions import METAICL_PARTITIONS

ROOT = Path(__file__).resolve().parents[1]
PAPER = ["recipes/gpt2/metaicl.yaml", "recipes/t5/metaicl.yaml", "recipes/llama/llama3.2-1b-metaicl.yaml"]


@pytest.mark.parametrize("path", PAPER)
@pytest.mark.parametrize("partition", METAICL_PARTITIONS)
def test_each_recipe_takes_each_metaicl_partition(path, partition):
    recipe = load_recipe(path, [f"tasks.partition={partition}"])
    assert recipe.tasks.partition == partition and str(recipe.tasks.data_dir) == "data/metaicl"


@pytest.mark.parametrize("path", PAPER)
def test_the_headers_partition_override_loads(path, tmp_path):
    header = [line[1:].strip() for line in (ROOT / path).read_text().splitlines() if line.startswith("#")]
    (line,) = [h for h in header if h.startswith("tasks.partition=")]
    overrides = shlex.split(line)
    stage1 = dict(o.split("=", 1) for o in overrides)["finetune.init_from"]
    assert stage1 == f"{load_recipe(path).output_dir}/pretrain"  # the default run's stage 1, shared
    (tmp_path / "pretrain").mkdir()
    overrides = [o if not o.startswith("finetune.init_from=") else f"finetune.init_from={tmp_path / 'pretrain'}"
                 for o in overrides]
    recipe = load_recipe(path, overrides)
    assert recipe.tasks.partition == "qa_to_qa" and recipe.output_dir.name.endswith("qa_to_qa")
    for partition in METAICL_PARTITIONS:
        assert partition in "\n".join(header)  # every partition a user may put there is named


@pytest.mark.parametrize("path", PAPER)
def test_stage_1_streams_c4_and_splits_80_20(path):
    pretrain = load_recipe(path).pretrain
    assert (pretrain.hf_dataset, pretrain.hf_config, pretrain.demo_fraction) == ("allenai/c4", "en", 0.8)
    assert pretrain.max_length == 1024


@pytest.mark.parametrize("path, llm, distiller", [("recipes/gpt2/metaicl.yaml", "gpt2-large", "gpt2"),
                                                  ("recipes/t5/metaicl.yaml", "google/t5-large-lm-adapt",
                                                   "google/t5-base-lm-adapt")])
def test_gpt2_and_t5_recipes_hold_the_papers_settings(path, llm, distiller):
    r = load_recipe(path)
    assert (r.llm.source, r.distiller.source, r.num_vectors) == (llm, distiller, 100)
    assert r.distiller.max_length + r.num_vectors <= 1024  # GPT-2's positions (T5's only bound the cost)
    assert (r.pretrain.lr, r.finetune.lr) == (5e-5, 1e-5)
    assert (r.finetune.ce_weight, r.finetune.kl_weight) == (1.0, 1.0)
    for spec in (r.pretrain, r.finetune):
        assert (spec.steps, spec.batch_size, spec.grad_accum) == (30000, 8, 1)  # up to 30k steps, global batch 8
        assert (spec.mixed_precision, spec.warmup_steps, spec.weight_decay, spec.max_grad_norm) == ("bf16", 0, 0, 1)
    assert (r.tasks.k, r.tasks.seeds) == (16, [100, 13, 21, 42, 87])


def test_the_llama_recipe_distils_with_its_own_first_layers_and_lora():
    r = load_recipe("recipes/llama/llama3.2-1b-metaicl.yaml")
    assert r.backend == "llama" and r.llm.source == "meta-llama/Llama-3.2-1B-Instruct"
    assert r.distiller.init_from_llm_layers == 4 and r.distiller.lora is not None and r.distiller.source is None
