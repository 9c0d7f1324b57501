"""Anchored distillers (distiller.anchor), the embedding-scale projector, and the stage-2 episode
options: label remapping, every task as meta-train, task sampling in proportion to size."""
import io
import json
import shutil

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from mendctl.models.anchors import anchor_embeddings, anchor_ids, label_ids, set_anchors
from mendctl.training.checkpoint import load_distiller, save_distiller
from mendctl.core.config import RecipeError
from mendctl.commands.distill import run_distill
from mendctl.evaluation.scoring import demo_sets
from mendctl.training.trained import load_trained
from mendctl.models.distiller import distill
from mendctl.commands.eval import run_eval
from mendctl.training.examples import REMAP_WORDS, TaskExamples, family, meta_train_tasks
from mendctl.core.registry import get_backend
from mendctl.models.render import context_ids, render_query
from mendctl.commands.train import train
from mendctl.data.workspace import data_dir, partition_for

QUIET = Console(file=io.StringIO())


def _sets(recipe, models):
    template = get_backend(recipe.backend).template(recipe)
    return template, demo_sets(recipe, template, models.llm_tokenizer)


@pytest.mark.parametrize("backend", ["llama", "gpt2", "t5"])
def test_an_untrained_anchored_distiller_gives_exactly_the_last_k_context_embeddings(tiny, backend):
    recipe = tiny(backend, "distiller.anchor=last")
    models = get_backend(backend).build(recipe)
    template, sets = _sets(recipe, models)
    vectors = distill(models, [s.context for s in sets], recipe.distiller.max_length, 3,
                     set_anchors(recipe, template, sets, models.llm_tokenizer))
    for s, v in zip(sets, vectors):
        last = context_ids(template, s.context, models.llm_tokenizer)[-recipe.num_vectors:]
        assert len(last) == recipe.num_vectors
        assert torch.equal(v, models.llm.embed(torch.tensor(last)))  # what icl-truncated reads, bit for bit


def test_labels_anchors_are_the_demonstrations_outputs_and_short_rows_are_left_padded_with_zeros(tiny):
    recipe = tiny("llama", "distiller.anchor=labels", "num_vectors=8")
    models = get_backend("llama").build(recipe)
    template, sets = _sets(recipe, models)
    tok = models.llm_tokenizer
    ids = set_anchors(recipe, template, sets[:1], tok)[0]
    wanted = [i for d in sets[0].demos for i in tok(template.output.replace("{output}", d["output"]),
                                                  add_special_tokens=False).input_ids][-8:]
    assert ids == wanted and ids == [i for d in label_ids(template, sets[0].demos, tok) for i in d][-8:]
    rows = anchor_embeddings(models.llm, [[5, 6, 7], []], 8)
    assert torch.equal(rows[0, 5:], models.llm.embed(torch.tensor([5, 6, 7])))
    assert not rows[0, :5].any() and not rows[1].any()
    assert anchor_ids("labels", [1, 2, 3], [], 2) == [2, 3]  # stage-1 text has no outputs: its last tokens


def test_label_set_anchors_hold_each_distinct_output_once_in_order_of_last_appearance():
    # outputs a, b, a, c (ids [7, 8], [9], [7, 8], [4]): b, then a, then c, each once
    labels = [[7, 8], [9], [7, 8], [4]]
    assert anchor_ids("label_set", [1, 2], labels, 8) == [9, 7, 8, 4]
    assert anchor_ids("label_set", [1, 2], labels, 3) == [7, 8, 4]  # the last k of them
    assert anchor_ids("labels", [1, 2], labels, 8) == [7, 8, 9, 7, 8, 4]
    assert anchor_ids("label_set", [1, 2, 3], [], 2) == [2, 3]


def test_label_set_filled_anchors_fill_free_slots_with_the_last_demonstration_tokens():
    labels = [[7, 8], [9], [7, 8], [4]]
    ctx = [1, 2, 3, 7, 8, 5, 4]
    assert anchor_ids("label_set_filled", ctx, labels, 6) == [5, 4, 9, 7, 8, 4]  # 2 free slots: ctx's last 2
    assert anchor_ids("label_set_filled", ctx, labels, 4) == anchor_ids("label_set", ctx, labels, 4) == [9, 7, 8, 4]
    assert anchor_ids("label_set_filled", ctx, labels, 20) == ctx + [9, 7, 8, 4]  # a short context: fewer than k
    assert anchor_ids("label_set_filled", ctx, [], 3) == [8, 5, 4]  # stage-1 text: the last tokens


def test_label_set_anchors_in_distillation_are_the_distinct_outputs(tiny):
    recipe = tiny("llama", "distiller.anchor=label_set", "num_vectors=8")
    models = get_backend("llama").build(recipe)
    template, sets = _sets(recipe, models)
    tok = models.llm_tokenizer
    outputs = [d["output"] for d in sets[0].demos]
    order = sorted(set(outputs), key=lambda o: max(n for n, x in enumerate(outputs) if x == o))
    wanted = [i for o in order for i in tok(template.output.replace("{output}", o), add_special_tokens=False).input_ids]
    assert len(set(outputs)) < len(outputs)  # the fixture repeats labels: the set is shorter
    assert set_anchors(recipe, template, sets[:1], tok)[0] == wanted[-8:]


def test_untrained_anchored_mend_scores_as_icl_truncated_in_eval(tiny, tmp_path):
    recipe = tiny("llama", "distiller.anchor=last")
    models, _ = load_trained(recipe, require=False)
    save_distiller(recipe.stage_dir("finetune"), models.distiller, recipe, {})
    results = run_eval(recipe, limit=3, console=QUIET)
    for task in results["tasks"].values():
        for seed in task["seeds"].values():
            m = seed["methods"]
            assert m["mend"]["predictions"] == m["icl-truncated"]["predictions"]
            assert m["mend"]["score"] == m["icl-truncated"]["score"]


def test_anchored_training_moves_the_correction_and_saves_no_anchor(tiny):
    recipe = tiny("llama", "distiller.anchor=last", "finetune.steps=3", "finetune.lr=1e-2")
    path = train(recipe, "finetune", console=QUIET)
    saved = load_file(str(path))
    assert not any("projector" in k for k in saved)
    assert saved["correction.1.weight"].abs().sum() > 0  # trained away from its zero start
    before = get_backend("llama").build(recipe).distiller.state_dict()
    assert set(saved) <= set(before)  # every saved tensor is a distiller parameter: no anchor in the file
    run_distill(recipe, console=QUIET)  # `mendctl distill` reads it back and makes anchored vectors
    models, _ = load_trained(recipe)
    template, sets = _sets(recipe, models)
    anchors = set_anchors(recipe, template, sets[:1], models.llm_tokenizer)
    v = distill(models, [sets[0].context], recipe.distiller.max_length, 1, anchors)[0]
    assert not torch.equal(v, anchor_embeddings(models.llm, anchors, recipe.num_vectors)[0])
    plain = get_backend("llama").build(tiny("llama"))
    with pytest.raises(ValueError, match="does not fit"):
        load_distiller(plain.distiller, path)


def test_weights_trained_on_one_anchor_mode_are_refused_by_another(tiny):
    recipe = tiny("llama", "distiller.anchor=label_set")
    models = get_backend("llama").build(recipe)
    path = save_distiller(recipe.stage_dir("finetune"), models.distiller, recipe, {})
    load_distiller(models.distiller, path)  # its own mode loads
    labels = get_backend("llama").build(tiny("llama", "distiller.anchor=labels"))
    with pytest.raises(ValueError, match="trained with distiller.anchor=label_set; this recipe has distiller.anchor=labels"):
        load_distiller(labels.distiller, path)
    # a training start may change the mode (stage 1's text gives every label mode the same anchors)
    start = tiny("llama", "distiller.anchor=labels", "finetune.steps=1", f"finetune.init_from={path}",
                 "output_dir=" + str(recipe.output_dir) + "-labels")
    assert train(start, "finetune", console=QUIET).is_file()


def _slot_hidden(distiller, ids, mask, anchors):
    """The placeholders' hidden states, as the correction reads them."""
    seen = []
    handle = distiller.correction.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    distiller(ids, mask, anchors)
    handle.remove()
    return seen[0]


def test_read_anchors_keeps_the_exact_start_and_lets_each_slot_see_its_anchor(tiny, tmp_path):
    recipe = tiny("llama", "distiller.anchor=label_set", "distiller.read_anchors=true", "num_vectors=4")
    distiller = get_backend("llama").build(recipe).distiller
    ids, mask = torch.randint(3, 50, (2, 12)), torch.ones(2, 12, dtype=torch.long)
    anchors = torch.randn(2, 4, distiller.anchor_in.in_features)
    assert torch.equal(distiller(ids, mask, anchors), anchors)  # step 0: exactly the anchors
    swapped = anchors.clone()
    swapped[:, 0] = anchors[:, 1]
    # slot 0's hidden state, so its correction, follows its own anchor
    assert not torch.allclose(_slot_hidden(distiller, ids, mask, anchors)[:, 0],
                              _slot_hidden(distiller, ids, mask, swapped)[:, 0])
    plain = get_backend("llama").build(tiny("llama", "distiller.anchor=label_set", "num_vectors=4")).distiller
    assert plain.anchor_in is None  # without the key the slots are blind to their anchors
    assert torch.equal(_slot_hidden(plain, ids, mask, anchors), _slot_hidden(plain, ids, mask, swapped))
    path = save_distiller(tmp_path, distiller, recipe, {})
    assert "anchor_in.weight" in load_file(str(path))
    with pytest.raises(ValueError, match="does not fit"):
        load_distiller(plain, path)
    with pytest.raises(RecipeError, match="read_anchors needs anchors"):
        tiny("llama", "distiller.read_anchors=true")


def test_max_correction_bounds_each_slot_and_keeps_the_start(tiny):
    recipe = tiny("llama", "distiller.anchor=last", "distiller.max_correction=0.25", "num_vectors=4")
    distiller = get_backend("llama").build(recipe).distiller
    ids, mask = torch.randint(3, 50, (2, 12)), torch.ones(2, 12, dtype=torch.long)
    anchors = torch.randn(2, 4, distiller.correction[1].out_features)
    assert torch.equal(distiller(ids, mask, anchors), anchors)  # step 0: exactly the anchors
    # the zero correction still learns: its last layer gets the gradient it gets unbounded
    distiller(ids, mask, anchors).pow(2).sum().backward()
    grad = distiller.correction[1].weight.grad
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    unbounded = get_backend("llama").build(tiny("llama", "distiller.anchor=last", "num_vectors=4")).distiller
    unbounded(ids, mask, anchors).pow(2).sum().backward()
    assert torch.allclose(grad, unbounded.correction[1].weight.grad, atol=1e-6)
    with torch.no_grad():
        for d in (distiller, unbounded):  # a large trained correction
            d.correction[1].bias.fill_(5.0)
        bounded, free = distiller(ids, mask, anchors) - anchors, unbounded(ids, mask, anchors) - anchors
    assert (free.norm(dim=-1) > anchors.norm(dim=-1)).all()
    assert (bounded.norm(dim=-1) <= 0.25 * anchors.norm(dim=-1) + 1e-5).all()
    # squashed in norm only: each slot's correction keeps its direction
    assert torch.allclose(torch.nn.functional.cosine_similarity(bounded, free, dim=-1), torch.ones(2, 4), atol=1e-5)
    with pytest.raises(RecipeError, match="max_correction bounds the correction of anchors"):
        tiny("llama", "distiller.max_correction=0.5")


def test_weights_trained_with_a_bound_make_vectors_only_under_it(tiny):
    recipe = tiny("llama", "distiller.anchor=last", "distiller.max_correction=0.25")
    models = get_backend("llama").build(recipe)
    path = save_distiller(recipe.stage_dir("finetune"), models.distiller, recipe, {})
    load_distiller(models.distiller, path)
    unbounded = get_backend("llama").build(tiny("llama", "distiller.anchor=last")).distiller
    with pytest.raises(ValueError, match="trained with distiller.max_correction=0.25; this recipe has "
                                         "distiller.max_correction=None"):
        load_distiller(unbounded, path)
    load_distiller(unbounded, path, for_vectors=False)  # as a training start it may go unbounded


def test_scale_to_embeddings_puts_plain_vectors_at_the_embeddings_scale(tiny):
    recipe = tiny("llama", "distiller.scale_to_embeddings=true")
    models = get_backend("llama").build(recipe)
    template, sets = _sets(recipe, models)
    v = torch.stack(distill(models, [s.context for s in sets], recipe.distiller.max_length, 4))
    table = models.llm.model.get_input_embeddings().weight
    ratio = v.norm(dim=-1).mean() / table.norm(dim=-1).mean()
    assert 0.7 < ratio < 1.4, ratio
    with pytest.raises(RecipeError, match="scale_to_embeddings"):
        tiny("llama", "distiller.scale_to_embeddings=true", "distiller.anchor=last")


def _examples(recipe, models, tasks=None):
    root = data_dir(recipe)
    names = tasks or meta_train_tasks(recipe.finetune, root, partition_for(recipe), recipe.tasks)
    return TaskExamples(recipe.finetune, recipe.tasks, root, names, get_backend(recipe.backend).template(recipe),
                        models.llm_tokenizer, recipe.seed)


def test_remapped_episodes_replace_each_label_by_one_word_in_demonstrations_and_target(tiny):
    plain_recipe, remap_recipe = tiny("llama"), tiny("llama", "finetune.remap_labels=1")
    models = get_backend("llama").build(plain_recipe)
    plain, remapped = _examples(plain_recipe, models), _examples(remap_recipe, models)
    tok = models.llm_tokenizer
    for position in range(12):
        a, b = plain.get(position), remapped.get(position)
        assert a.x == b.x  # the same query of the same task: only labels change
        old, new = tok.decode(a.y).strip(), tok.decode(b.y).strip()
        assert new in REMAP_WORDS and new != old
        mapping = {old: new}
        lines_a, lines_b = a.distiller_text.split("\n"), b.distiller_text.split("\n")
        assert len(lines_a) == len(lines_b)
        for la, lb in zip(lines_a, lines_b):
            (ia, oa), (ib, ob) = la.rsplit(" ", 1), lb.rsplit(" ", 1)
            assert ia == ib and ob in REMAP_WORDS
            assert mapping.setdefault(oa, ob) == ob  # one word per label for the whole episode
        assert len(set(mapping.values())) == len(mapping)  # and distinct labels stay distinct
    half = _examples(tiny("llama", "finetune.remap_labels=0.5"), models)
    changed = sum(half.get(p).y != plain.get(p).y for p in range(40))
    assert 8 < changed < 32


def test_remapping_leaves_an_episode_whose_demonstrations_answer_from_other_options(tiny, tmp_path):
    root = tmp_path / "tasks"
    shutil.copytree("data/tiny/tasks", root)
    (root / "tiny_quiz").mkdir()
    # every question its own two answers (a converted task with bigbench_options: per_example)
    rows = [{"input": f"q{i}", "output": f"a{i}", "options": [f"a{i}", f"b{i}"]} for i in range(30)]
    (root / "tiny_quiz" / "tiny_quiz_16384_100_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tiny("llama", f"tasks.data_dir={root}", "finetune.remap_labels=1")
    models = get_backend("llama").build(recipe)
    episodes = _examples(recipe, models, ["tiny_quiz"])
    tok = models.llm_tokenizer
    for position in range(6):
        e = episodes.get(position)
        n = int(tok.decode(e.x).strip()[1:])
        assert tok.decode(e.y).strip() == f"a{n}"  # the row's own answer, not a word
        assert {tok.decode(o).strip() for o in e.options} == {f"a{n}", f"b{n}"}
        assert all(line.rsplit(" ", 1)[1] == "a" + line.split()[0][1:] for line in e.distiller_text.split("\n"))


def test_all_train_tasks_take_every_classification_task_but_the_test_ones(tiny, tmp_path):
    root = tmp_path / "tasks"
    shutil.copytree("data/tiny/tasks", root)
    extra = root / "tiny_extra"
    extra.mkdir()
    rows = [{"input": f"word {i}", "output": "x" if i % 3 else "y", "options": ["x", "y"]} for i in range(200)]
    (extra / "tiny_extra_16384_100_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "tiny_free").mkdir()
    (root / "tiny_free" / "tiny_free_16384_100_train.jsonl").write_text(
        "".join(json.dumps({"input": f"q{i}", "output": f"a{i}", "options": []}) + "\n" for i in range(50)))
    # a test task (tiny_sentiment) in another language: its family is held out with it
    shutil.copytree(root / "tiny_sentiment", root / "tiny_sentiment-de")
    (root / "tiny_sentiment-de" / "tiny_sentiment_16384_100_train.jsonl").rename(
        root / "tiny_sentiment-de" / "tiny_sentiment-de_16384_100_train.jsonl")
    recipe = tiny("llama", f"tasks.data_dir={root}", "finetune.train_tasks=all")
    partition = partition_for(recipe)
    names = meta_train_tasks(recipe.finetune, root, partition, recipe.tasks)
    assert names == sorted(list(partition.train) + ["tiny_extra"])
    # a validation task is held out with its family (tiny_color-hex beside tiny_color)
    shutil.copytree(root / "tiny_extra", root / "tiny_color-hex")
    (root / "tiny_color-hex" / "tiny_extra_16384_100_train.jsonl").rename(
        root / "tiny_color-hex" / "tiny_color-hex_16384_100_train.jsonl")
    assert "tiny_color-hex" in meta_train_tasks(recipe.finetune, root, partition, recipe.tasks)
    held = tiny("llama", f"tasks.data_dir={root}", "finetune.train_tasks=all", "tasks.validation=[tiny_color]")
    assert meta_train_tasks(held.finetune, root, partition, held.tasks) == sorted(
        ["tiny_extra", *(t for t in partition.train if t != "tiny_color")])
    assert meta_train_tasks(tiny("llama").finetune, root, partition, recipe.tasks) == list(partition.train)
    # with `all` a validation task may come from beyond the partition's train list, and is held out too;
    # a test task's family stays refused, and with `partition` the train list is the limit
    beyond = tiny("llama", f"tasks.data_dir={root}", "finetune.train_tasks=all", "tasks.validation=[tiny_extra]")
    assert meta_train_tasks(beyond.finetune, root, partition, beyond.tasks) == sorted([*partition.train, "tiny_color-hex"])
    with pytest.raises(RecipeError, match=r"test tasks .*\['tiny_sentiment-de'\]"):
        tiny("llama", f"tasks.data_dir={root}", "finetune.train_tasks=all", "tasks.validation=[tiny_sentiment-de]")
    with pytest.raises(RecipeError, match=r"not in its train list: \['tiny_extra'\]"):
        tiny("llama", f"tasks.data_dir={root}", "tasks.validation=[tiny_extra]")

    models = get_backend("llama").build(recipe)
    drawn = {}
    for sampling in ("uniform", "proportional"):
        ex = _examples(tiny("llama", f"tasks.data_dir={root}", f"finetune.task_sampling={sampling}"), models, names)
        template = get_backend("llama").template(recipe)
        extra_x = {tuple(render_query(template, r["input"], [], models.llm_tokenizer, after_context=True).x)
                   for r in rows}
        drawn[sampling] = sum(tuple(ex.get(p).x) in extra_x for p in range(300)) / 300
    # tiny_extra holds 200 of 392 examples: about 1/5 of episodes drawn uniformly, about half in proportion.
    assert drawn["uniform"] < 0.32 and drawn["proportional"] > 0.38, drawn


def test_family_sampling_draws_each_family_alike_whatever_its_number_of_tasks(tiny, tmp_path):
    root = tmp_path / "tasks"
    shutil.copytree("data/tiny/tasks", root)
    rows = [{"input": f"word {i}", "output": "x" if i % 3 else "y", "options": ["x", "y"]} for i in range(40)]
    for sub in ("a", "b", "c", "d"):  # one family of four tasks beside the four one-task families
        (root / f"tiny_extra-{sub}").mkdir()
        (root / f"tiny_extra-{sub}" / f"tiny_extra-{sub}_16384_100_train.jsonl").write_text(
            "".join(json.dumps({**r, "input": f"{sub} {r['input']}"}) + "\n" for r in rows))
    recipe = tiny("llama", f"tasks.data_dir={root}", "finetune.train_tasks=all", "finetune.task_sampling=family")
    names = meta_train_tasks(recipe.finetune, root, partition_for(recipe), recipe.tasks)
    assert len(names) == 8 and family("tiny_extra-c") == "tiny_extra" and family("tiny_parity") == "tiny_parity"
    models = get_backend("llama").build(recipe)
    template = get_backend("llama").template(recipe)
    extra_x = {tuple(render_query(template, f"{sub} {r['input']}", [], models.llm_tokenizer, after_context=True).x)
               for sub in "abcd" for r in rows}
    share = {}
    for sampling in ("uniform", "family"):
        ex = _examples(tiny("llama", f"tasks.data_dir={root}", f"finetune.task_sampling={sampling}"), models, names)
        share[sampling] = sum(tuple(ex.get(p).x) in extra_x for p in range(300)) / 300
    # uniform over 8 tasks: half the episodes from the family of four; over 5 families: a fifth
    assert share["uniform"] > 0.4 and share["family"] < 0.3, share


def test_an_episode_of_several_queries_shares_demonstrations_and_labels_and_its_first_query_draws_as_before(
        tiny, tmp_path):
    root = tmp_path / "tasks"
    shutil.copytree("data/tiny/tasks", root)
    (root / "tiny_extra").mkdir()
    rows = [{"input": f"word {i}", "output": "xyz"[i % 3], "options": ["x", "y", "z"]} for i in range(30)]
    (root / "tiny_extra" / "tiny_extra_16384_100_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = (f"tasks.data_dir={root}", "finetune.remap_labels=0.5")
    one, four = tiny("llama", *common), tiny("llama", *common, "finetune.queries_per_episode=4")
    models = get_backend("llama").build(one)
    single, episodes = _examples(one, models, ["tiny_extra"]), _examples(four, models, ["tiny_extra"])
    tok = models.llm_tokenizer
    remapped = checked = 0
    for episode in range(8):
        drawn = [episodes.get(4 * episode + j) for j in range(4)]
        first = single.get(episode)
        assert (drawn[0].x, drawn[0].y, drawn[0].ctx) == (first.x, first.y, first.ctx)
        assert all((e.distiller_text, e.ctx, e.labels) == (first.distiller_text, first.ctx, first.labels) for e in drawn)
        demos = [line.rsplit(" ", 1) for line in first.distiller_text.split("\n")]
        inputs = [tok.decode(e.x).strip() for e in drawn]
        assert len(set(inputs)) == 4 and not set(inputs) & {i for i, _ in demos}  # distinct, none a demonstration
        # one labelling for the episode: each query's target is its row's label under the demonstrations' map
        mapping = {rows[int(i.split()[1])]["output"]: o for i, o in demos}
        for e, x in zip(drawn, inputs):
            label = rows[int(x.split()[1])]["output"]
            if label in mapping:  # k = 4 demonstrations need not show every label
                checked += 1
                assert tok.decode(e.y).strip() == mapping[label]
        remapped += set(mapping.values()) != set(mapping)
    assert 0 < remapped < 8 and checked > 16
    with pytest.raises(RecipeError, match=r"finetune.*multiple of queries_per_episode"):
        tiny("llama", "finetune.queries_per_episode=3")  # batch_size 4 would split an episode
