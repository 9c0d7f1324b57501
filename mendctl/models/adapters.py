"""What of the distiller body trains: all of it, all but its token embeddings, or LoRA adapters only.

With LoRA (peft) the body's own weights are frozen and small low-rank adapters wrap its linear maps;
the adapters are never merged into the base weights, which may be the frozen LLM's own tensors.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from ..core.config import DistillerSpec


def prepare_body(body: nn.Module, spec: DistillerSpec, default_targets: tuple[str, ...], seed: int) -> nn.Module:
    if spec.freeze_embeddings:
        body.get_input_embeddings().requires_grad_(False)
    if spec.lora is None:
        return body
    from peft import LoraConfig, inject_adapter_in_model

    targets = spec.lora.target_modules or list(default_targets)
    if not targets:
        raise ValueError("this backend names no default LoRA modules: set distiller.lora.target_modules")
    config = LoraConfig(r=spec.lora.r, lora_alpha=spec.lora.alpha, lora_dropout=spec.lora.dropout,
                        target_modules=targets, bias="none")
    # Seeded so that two builds of one recipe start from the same adapters.
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(seed)
        # GPT-2's Conv1D stores its weight transposed; peft notices and says so.
        warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False")
        # In place: the body keeps its class and forward, with only the adapters requiring grad.
        inject_adapter_in_model(config, body)
    return body


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors training changes, by name: all a saved distiller needs on top of its recipe."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}
