"""For each backend on its tiny recipe: vector shapes, a frozen LLM, a trainable distiller, vectors files."""
import pytest
import torch

from mendctl import apply, load_vectors
from mendctl.core.registry import get_backend
from mendctl.models.distiller import distiller_inputs, tokens_read
from mendctl.core.vectors import VectorsMismatch, save_vectors

BACKENDS = ("gpt2", "t5", "llama")


def build(tiny, backend, *overrides):
    recipe = tiny(backend, *overrides)
    return recipe, get_backend(recipe.backend).build(recipe)


def vectors_for(models, texts):
    ids, mask = distiller_inputs(texts, models.distiller_tokenizer, 512, "cpu")
    return models.distiller(ids, mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vectors_have_shape_batch_k_dllm(tiny, backend):
    recipe, models = build(tiny, backend)
    v = vectors_for(models, ["a b c", "a longer demonstration"])
    assert v.shape == (2, recipe.num_vectors, models.llm.hidden_size)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vectors_do_not_depend_on_what_they_are_batched_with(tiny, backend):
    _, models = build(tiny, backend)
    models.distiller.eval()
    alone = vectors_for(models, ["the cat says meow"])
    batched = vectors_for(models, ["the cat says meow", "a much longer demonstration set that forces padding " * 3])
    torch.testing.assert_close(batched[0], alone[0], atol=1e-5, rtol=1e-5)


def test_tokens_read_counts_what_distiller_inputs_keeps(tiny):
    _, models = build(tiny, "llama")
    text = "a much longer demonstration set " * 20
    ids, mask = distiller_inputs([text], models.distiller_tokenizer, 16, "cpu")
    assert tokens_read(models, text, 16) == int(mask.sum()) == 16
    short = "the cat"
    assert tokens_read(models, short, 16) == len(models.distiller_tokenizer(short, add_special_tokens=False).input_ids)
    models.distiller.max_input = 5  # a body with few positions cuts again, beside its K placeholders
    assert tokens_read(models, text, 16) == 5


@pytest.mark.parametrize("backend", BACKENDS)
def test_optimiser_step_changes_distiller_not_llm(tiny, backend):
    _, models = build(tiny, backend)
    llm_before = {k: v.clone() for k, v in models.llm.model.state_dict().items()}
    dist_before = {k: v.clone() for k, v in models.distiller.state_dict().items()}
    opt = torch.optim.AdamW(models.distiller.parameters(), lr=1e-2)
    v = vectors_for(models, ["some demonstrations", "other ones"])
    x = [torch.tensor([5, 6, 7]), torch.tensor([8, 9])]
    y = [torch.tensor([10, 11]), torch.tensor([12])]
    out = models.llm.target_logits(list(v), x, y)
    torch.nn.functional.cross_entropy(out.logits, out.targets).backward()
    assert all(p.grad is None for p in models.llm.model.parameters())
    assert all(not p.requires_grad for p in models.llm.model.parameters())
    assert models.distiller.placeholders.grad is not None and models.distiller.placeholders.grad.abs().sum() > 0
    opt.step()
    for k, v in models.llm.model.state_dict().items():
        assert torch.equal(v, llm_before[k]), k
    changed = [k for k, v in models.distiller.state_dict().items() if not torch.equal(v, dist_before[k])]
    assert "placeholders" in changed and len(changed) > 2


def _meta(recipe, models, **extra):
    meta = {"backend": recipe.backend, "llm_id": models.llm_id, "llm_config_hash": models.llm_config_hash,
            "distiller_hash": "abc", "task": "t", "seed": 1, "num_demos": 2, "demos_hash": "d",
            "template": {"input": "{input}", "output": " {output}", "separator": "\n"}}
    meta.update(extra)
    return meta


@pytest.mark.parametrize("backend", BACKENDS)
def test_vectors_file_round_trips_and_runs_without_distiller(tiny, backend, tmp_path):
    recipe, models = build(tiny, backend)
    v = vectors_for(models, ["the cat says meow"])[0].detach()
    path = tmp_path / "v" / "t.safetensors"
    save_vectors(path, v, _meta(recipe, models))
    loaded = load_vectors(path, models.llm.model)
    assert torch.equal(loaded.vectors, v)
    assert loaded.metadata["task"] == "t" and loaded.metadata["num_vectors"] == str(recipe.num_vectors)
    assert loaded.template["separator"] == "\n"
    assert not list(tmp_path.glob("v/*.tmp"))
    out = apply(models.llm.model, models.llm_tokenizer, path, "the dog says", ["woof", "meow"])
    assert out["prediction"] in ("woof", "meow")
    # The vectors stand in for demonstrations, so the query follows them with the separator first.
    expected = models.llm.option_losses(v, torch.tensor(models.llm_tokenizer("\nthe dog says").input_ids),
                                        [torch.tensor(models.llm_tokenizer(" woof").input_ids),
                                         torch.tensor(models.llm_tokenizer(" meow").input_ids)])
    assert out["losses"]["woof"] == pytest.approx(float(expected[0]), rel=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vectors_for_another_llm_are_refused(tiny, backend, tmp_path):
    recipe, models = build(tiny, backend)
    v = vectors_for(models, ["abc"])[0].detach()
    path = tmp_path / "v.safetensors"
    save_vectors(path, v, _meta(recipe, models))
    _, other = build(tiny, backend, "llm.random_init.layers=3")
    with pytest.raises(VectorsMismatch, match="distilled for LLM"):
        load_vectors(path, other.llm.model)


def test_a_file_that_is_not_a_vectors_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "x.safetensors"
    save_file({"weights": torch.zeros(2)}, str(path))
    with pytest.raises(VectorsMismatch, match="not a mendctl vectors file"):
        load_vectors(path)


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_builds_of_one_recipe_give_the_same_distiller(tiny, backend):
    _, a = build(tiny, backend)
    _, b = build(tiny, backend)
    for k, v in a.distiller.state_dict().items():
        assert torch.equal(v, b.distiller.state_dict()[k]), k


@pytest.mark.parametrize("backend", BACKENDS)
def test_distiller_from_the_llms_first_layers_is_an_independent_copy(tiny, backend):
    _, models = build(tiny, backend, "distiller.random_init=null", "distiller.init_from_llm_layers=1")
    body, llm_embed = models.distiller.body, models.llm.model.get_input_embeddings().weight
    assert body.config.num_hidden_layers == 1
    assert models.distiller_tokenizer is models.llm_tokenizer
    assert torch.equal(body.get_input_embeddings().weight, llm_embed)
    assert body.get_input_embeddings().weight.data_ptr() != llm_embed.data_ptr()
    assert all(p.requires_grad for p in body.parameters())
    assert not any(p.requires_grad for p in models.llm.model.parameters())


def test_init_from_more_layers_than_the_llm_has_is_an_error(tiny):
    with pytest.raises(ValueError, match="init_from_llm_layers=5 but the LLM has 2 layers"):
        build(tiny, "llama", "distiller.init_from_llm_layers=5")


@pytest.mark.parametrize("backend", BACKENDS)
def test_distiller_dtype_sets_the_body_weights(tiny, backend):
    _, models = build(tiny, backend, "distiller.dtype=bfloat16")
    assert {p.dtype for p in models.distiller.body.parameters()} == {torch.bfloat16}
    v = vectors_for(models, ["some demonstrations"])
    assert v.dtype == torch.float32 and torch.isfinite(v).all()


@pytest.mark.parametrize("backend", ("gpt2", "llama"))
def test_llm_sequences_start_with_bos_exactly_for_families_that_use_one(tiny, backend):
    _, models = build(tiny, backend)
    llm, tok = models.llm, models.llm_tokenizer
    assert get_backend(backend).add_bos == (backend == "llama")
    prefix, x, y = [10, 11], [5, 6, 7], [8, 9]
    seq = ([tok.bos_token_id] if backend == "llama" else []) + prefix + x + y
    with torch.no_grad():
        out = llm.target_logits([llm.embed(torch.tensor(prefix))], [torch.tensor(x)], [torch.tensor(y)])
        reference = llm.model(input_ids=torch.tensor([seq])).logits[0]
    assert out.targets.tolist() == x + y
    torch.testing.assert_close(out.logits, reference[len(seq) - len(x + y) - 1:-1], atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # zero-shot too: with BOS the first query token is predicted from it
        alone = llm.target_logits([llm.embed(torch.tensor([], dtype=torch.long))], [torch.tensor(x)], [torch.tensor(y)])
    assert alone.targets.tolist() == (x + y if backend == "llama" else x[1:] + y)


def test_vectors_files_carry_no_bos_and_apply_adds_it_once(tiny, tmp_path):
    recipe, models = build(tiny, "llama")
    v = vectors_for(models, ["the cat says meow"])[0].detach()
    path = tmp_path / "v.safetensors"
    save_vectors(path, v, _meta(recipe, models))
    assert load_vectors(path).vectors.shape[0] == recipe.num_vectors
    tok, model = models.llm_tokenizer, models.llm.model
    out = apply(model, tok, path, "the dog says", ["woof"])
    x, o = tok("\nthe dog says").input_ids, tok(" woof").input_ids
    embed = model.get_input_embeddings()
    with torch.no_grad():
        seq = torch.cat([embed(torch.tensor([tok.bos_token_id])), v, embed(torch.tensor(x + o))]).unsqueeze(0)
        logits = model(inputs_embeds=seq).logits[0]
    expected = torch.nn.functional.cross_entropy(logits[-len(o) - 1:-1], torch.tensor(o))
    assert out["losses"]["woof"] == pytest.approx(float(expected), rel=1e-5)
