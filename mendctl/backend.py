"""What a backend plugin provides, and how the core turns a recipe into an LLM and a distiller.

A backend is a thin subclass of `Backend`: its model classes, a tiny config for random
initialisation, where its layer stack lives, and its default template. Everything else (freezing,
placeholders, padding, scoring) is shared here and in `lm.py` / `distiller.py`.
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from transformers import AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from .config import DistillerSpec, ModelSpec, RandomInit, Recipe, TemplateSpec
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


def config_hash(config: PretrainedConfig) -> str:
    keep = {k: v for k, v in config.to_dict().items()
            if k not in ("transformers_version", "_name_or_path", "dtype", "torch_dtype", "architectures")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Backend:
    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    lm_class: ClassVar[type[FrozenLM]]
    llm_class: ClassVar[type]        # a transformers LM class with from_pretrained / from_config
    distiller_class: ClassVar[type]  # the distiller body: a base model returning last_hidden_state
    layers_attr: ClassVar[str]       # attribute of the base model holding its nn.ModuleList of layers
    gated_mlp: ClassVar[bool] = True  # three MLP matrices (SwiGLU-style) or two: FLOPs counting needs it
    distiller_is_causal: ClassVar[bool] = True
    default_template: ClassVar[TemplateSpec] = TemplateSpec(input="{input}\n", output="{output}", separator="\n\n")

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
            tokenizer = AutoTokenizer.from_pretrained(src.path)
            model = self.llm_class.from_pretrained(src.path, dtype=dtype)
            identity = src.identity
        if tokenizer.pad_token_id is None:
            # Pads are always masked out; any id will do, eos is the usual choice.
            tokenizer.pad_token = tokenizer.eos_token
        return self.lm_class(model, tokenizer.pad_token_id), tokenizer, identity

    def distiller_body_from_llm(self, llm: FrozenLM, layers: int) -> nn.Module:
        """The LLM's embeddings and first `layers` layers, as an independent trainable copy."""
        base = self.llm_base(llm.model)
        stack = getattr(base, self.layers_attr)
        if layers > len(stack):
            raise ValueError(f"distiller.init_from_llm_layers={layers} but the LLM has {len(stack)} layers")
        kept = nn.ModuleList(list(stack)[:layers])
        setattr(base, self.layers_attr, nn.ModuleList())
        body = copy.deepcopy(base)  # deepcopy without the dropped layers: no transient full copy
        setattr(base, self.layers_attr, stack)
        setattr(body, self.layers_attr, copy.deepcopy(kept))
        body.config = copy.deepcopy(base.config)
        body.config.num_hidden_layers = layers
        body.requires_grad_(True)
        return body

    def llm_base(self, model: nn.Module) -> nn.Module:
        return model.base_model

    def load_distiller_body(self, spec: DistillerSpec, llm: FrozenLM, llm_tokenizer: PreTrainedTokenizerBase,
                            seed: int) -> tuple[nn.Module, PreTrainedTokenizerBase]:
        dtype = DTYPES[spec.dtype]
        if spec.init_from_llm_layers:
            return self.distiller_body_from_llm(llm, spec.init_from_llm_layers).to(dtype), llm_tokenizer
        if spec.random_init is not None:
            tokenizer = byte_tokenizer()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                body = self.distiller_class(self.tiny_config(spec.random_init, tokenizer, encoder_only=True))
            return body.to(dtype), tokenizer
        src = self._resolve(spec, self.distiller_class)
        return self.distiller_class.from_pretrained(src.path, dtype=dtype), AutoTokenizer.from_pretrained(src.path)

    def build(self, recipe: Recipe) -> Models:
        llm, llm_tok, llm_id = self.load_llm(recipe.llm, recipe.seed)
        body, dist_tok = self.load_distiller_body(recipe.distiller, llm, llm_tok, recipe.seed + 1)
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
                                  anchor=recipe.distiller.anchor, embedding_stats=stats)
        return Models(llm, llm_tok, llm_id, config_hash(llm.model.config), distiller, dist_tok, self.gated_mlp)

    def template(self, recipe: Recipe) -> TemplateSpec:
        return recipe.template or self.default_template
