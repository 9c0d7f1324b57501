"""`ema`: an exponential moving average of the trained weights, for what a run scores and keeps.

At batch 2 the weights after any one step carry that step's noise, and a validation point scores
whatever the last batches left. With `ema` the average, not the last step, is what the curve scores
and what best.safetensors and the final distiller hold; the optimiser goes on stepping the raw
weights. (On the bench recipe, 0.95 did not lower the validation KL: docs/benchmarks.md.)
Checkpoints keep the average (Accelerate's register_for_checkpointing), so --resume continues it.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..models.adapters import trainable_state


class WeightAverage:
    """shadow <- d * shadow + (1 - d) * weights after each optimiser step, with d = min(decay,
    (1 + n) / (10 + n)) at the n-th update, so that the first steps are not pulled back to the start."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.params = trainable_state(model)
        self.shadow = {k: p.detach().clone() for k, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, p in self.params.items():
            self.shadow[k].lerp_(p.detach(), 1 - d)
        self.updates += 1

    @contextmanager
    def applied(self):
        """The model holds the average inside the block and its own weights again after it."""
        own = {k: p.detach().clone() for k, p in self.params.items()}
        self._copy_into_params(self.shadow)
        try:
            yield
        finally:
            self._copy_into_params(own)

    @torch.no_grad()
    def _copy_into_params(self, tensors: dict[str, torch.Tensor]) -> None:
        for k, p in self.params.items():
            p.copy_(tensors[k])

    def state_dict(self) -> dict:
        return {"updates": self.updates, "shadow": self.shadow}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        if state["shadow"].keys() != self.shadow.keys():
            raise ValueError("the checkpoint's weight average is not of this distiller's trained tensors")
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)
        self.updates = int(state["updates"])
