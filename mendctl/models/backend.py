"""What a backend plugin provides, and how the core turns a recipe into an LLM and a distiller.

A backend is a thin subclass of `Backend`: its model classes, a tiny config for random
initialisation, where its layer stack lives, and its default template. Everything else (freezing,
placeholders, padding, scoring) is shared here and in `lm.py` / `distiller.py`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from transformers import AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from ..core.config import DistillerSpec, ModelSpec, RandomInit, Recipe, TemplateSpec
from ..core.vectors import config_hash
from .adapters import prepare_body
from .distiller import Distiller
from .lm import FrozenLM
from .tokenizer import byte_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Models:
    llm: FrozenLM
    llm_tokenizer: PreTrainedTokenizerBase
    llm_id: str           # where the LLM came from, stable across machines
    llm_config_hash: str  # what it is: vectors made for another LLM are refused on this
    distiller: Distiller
    distiller_tokenizer: PreTrainedTokenizerBase
    gated_mlp: bool       # what FLOPs counting needs to know of both models' MLPs


def _load(cls, path: str, **kwargs):
    """from_pretrained, with the errors of a wrong source (no such hub id offline, damaged weights)
    as one message naming it rather than a traceback."""
    from .model_sources import ModelSourceError

    try:
        return cls.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelSourceError(f"cannot load {path}: {str(e).strip().splitlines()[0][:300]}") from e
    except Exception as e:  # safetensors' own error type for a truncated weights file
        if type(e).__name__ != "SafetensorError":
            raise
        raise ModelSourceError(f"cannot load {path}: damaged weights ({e})") from e


class Backend:
    name: ClassVar[str]
    lm_class: ClassVar[type[FrozenLM]]
    llm_class: ClassVar[type]        # a transformers LM class with from_pretrained / from_config
    distiller_class: ClassVar[type]  # the distiller body: a base model returning last_hidden_state
    layers_attr: ClassVar[str]       # attribute of the base model holding its nn.ModuleList of layers
    gated_mlp: ClassVar[bool] = True  # three MLP matrices (SwiGLU-style) or two: FLOPs counting needs it
    distiller_is_causal: ClassVar[bool] = True
    # The family was trained with a BOS token opening every sequence (Llama): the LLM then reads BOS
    # first, before demonstrations, vectors or nothing. Vectors files never contain it.
    add_bos: ClassVar[bool] = False
    default_template: ClassVar[TemplateSpec] = TemplateSpec(input="{input}\n", output="{output}", separator="\n\n")
    lora_targets: ClassVar[tuple[str, ...]] = ()  # default distiller.lora.target_modules: the layers' linear maps

    def tiny_config(self, spec: RandomInit, tokenizer: PreTrainedTokenizerBase, *, encoder_only: bool = False
                    ) -> PretrainedConfig:
        raise NotImplementedError

    # ------------------------------------------------------------------ loading

    def _resolve(self, spec: ModelSpec, model_class: type):
        from .model_sources import resolve_source

        return resolve_source(spec.source, spec.gguf_file, spec.dtype, model_class if spec.gguf_file else None)

    def load_llm(self, spec: ModelSpec, seed: int) -> tuple[FrozenLM, PreTrainedTokenizerBase, str]:
        dtype = DTYPES[spec.dtype]
        if spec.random_init is not None:
            tokenizer = byte_tokenizer()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = self.llm_class(self.tiny_config(spec.random_init, tokenizer)).to(dtype)
            identity = f"random-init:{self.name}:seed={seed}"
        else:
            src = self._resolve(spec, self.llm_class)
            tokenizer = _load(AutoTokenizer, src.path)
            model = _load(self.llm_class, src.path, dtype=dtype)
            identity = src.identity
        if tokenizer.pad_token_id is None:
            # Pads are always masked out; any id will do, eos is the usual choice.
            tokenizer.pad_token = tokenizer.eos_token
        return self.frozen_lm(model, tokenizer), tokenizer, identity

    def frozen_lm(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> FrozenLM:
        """The LLM wrapped for scoring, with this family's BOS convention (for training, eval and apply alike)."""
        if self.add_bos and tokenizer.bos_token_id is None:
            raise ValueError(f"the {self.name} backend starts every sequence with BOS but the tokenizer has no bos_token")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return self.lm_class(model, pad, tokenizer.bos_token_id if self.add_bos else None)

    def distiller_body_from_llm(self, llm: FrozenLM, layers: int, share: bool = False) -> nn.Module:
        """The LLM's embeddings and first `layers` layers, as an independent trainable copy.

        With `share`, the body gets its own modules (so that adapters wrap them, not the LLM's) holding
        the LLM's own frozen tensors: no weight is copied.
        """
        base = self.llm_base(llm.model)
        stack = getattr(base, self.layers_attr)
        if layers > len(stack):
            raise ValueError(f"distiller.init_from_llm_layers={layers} but the LLM has {len(stack)} layers")
        kept = nn.ModuleList(list(stack)[:layers])
        # deepcopy returns what the memo already holds: these tensors are reused, not copied.
        memo = {id(t): t for t in (*base.parameters(), *base.buffers())} if share else {}
        setattr(base, self.layers_attr, nn.ModuleList())
        body = copy.deepcopy(base, memo)  # deepcopy without the dropped layers: no transient full copy
        setattr(base, self.layers_attr, stack)
        setattr(body, self.layers_attr, copy.deepcopy(kept, memo))
        body.config = copy.deepcopy(base.config)
        body.config.num_hidden_layers = layers
        if not share:
            body.requires_grad_(True)
        return body

    def llm_base(self, model: nn.Module) -> nn.Module:
        return model.base_model

    def load_distiller_body(self, spec: DistillerSpec, llm: FrozenLM, llm_tokenizer: PreTrainedTokenizerBase,
                            seed: int) -> tuple[nn.Module, PreTrainedTokenizerBase]:
        dtype = DTYPES[spec.dtype]
        if spec.init_from_llm_layers:
            if spec.lora is not None:  # the LLM's dtype, which the recipe checks distiller.dtype equals
                return self.distiller_body_from_llm(llm, spec.init_from_llm_layers, share=True), llm_tokenizer
            return self.distiller_body_from_llm(llm, spec.init_from_llm_layers).to(dtype), llm_tokenizer
        if spec.random_init is not None:
            tokenizer = byte_tokenizer()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                body = self.distiller_class(self.tiny_config(spec.random_init, tokenizer, encoder_only=True))
            return body.to(dtype), tokenizer
        src = self._resolve(spec, self.distiller_class)
        return _load(self.distiller_class, src.path, dtype=dtype), _load(AutoTokenizer, src.path)

    def build(self, recipe: Recipe) -> Models:
        llm, llm_tok, llm_id = self.load_llm(recipe.llm, recipe.seed)
        body, dist_tok = self.load_distiller_body(recipe.distiller, llm, llm_tok, recipe.seed + 1)
        body = prepare_body(body, recipe.distiller, self.lora_targets, recipe.seed + 3)
        if dist_tok.pad_token_id is None:
            dist_tok.pad_token = dist_tok.eos_token
        init_std = getattr(body.config, "initializer_range", None) or getattr(body.config, "initializer_factor", 0.02)
        stats = None
        if recipe.distiller.scale_to_embeddings:
            table = llm.model.get_input_embeddings().weight.detach().float()
            stats = (table.mean(0), table.std(0))
        # Seeded so that two builds of one recipe start from the same placeholders and projector.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe.seed + 2)
            distiller = Distiller(body, llm.hidden_size, recipe.num_vectors,
                                  placeholder_init=recipe.distiller.placeholder_init,
                                  causal=self.distiller_is_causal, init_std=init_std,
                                  anchor=recipe.distiller.anchor, read_anchors=recipe.distiller.read_anchors,
                                  max_correction=recipe.distiller.max_correction, embedding_stats=stats)
        return Models(llm, llm_tok, llm_id, config_hash(llm.model.config), distiller, dist_tok, self.gated_mlp)

    def template(self, recipe: Recipe) -> TemplateSpec:
        return recipe.template or self.default_template
