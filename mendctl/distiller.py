"""The distiller: demonstrations in, K vectors in the LLM's embedding space out (method.md, "The parts")."""
from __future__ import annotations

import torch
from torch import nn


class Distiller(nn.Module):
    """A trainable LM body, K learnable placeholders appended after the demonstrations, a projector.

    Inputs are LEFT-padded so that the placeholders always sit right after the last real
    demonstration token; with a causal body, position ids are counted over real tokens only, so a
    demonstration set gives the same vectors whatever it is batched with.
    """

    def __init__(self, body: nn.Module, d_llm: int, num_vectors: int, *, placeholder_init: str = "random",
                 causal: bool = True, init_std: float = 0.02):
        super().__init__()
        self.body = body
        self.causal = causal
        embeddings = body.get_input_embeddings().weight
        d = embeddings.shape[1]
        if placeholder_init == "vocab":
            rows = torch.randint(0, embeddings.shape[0], (num_vectors,))
            init = embeddings.detach()[rows].clone().float()
        elif placeholder_init == "random":
            init = torch.randn(num_vectors, d) * init_std
        else:
            raise ValueError(f"placeholder_init must be 'random' or 'vocab', not {placeholder_init!r}")
        self.placeholders = nn.Parameter(init)
        # Inputs beyond the body's last position (GPT-2: 1024) minus the K placeholders are cut from
        # the left: the newest demonstrations are kept, as MetaICL does.
        from .positions import max_positions

        limit = max_positions(body.config)
        if limit is not None and limit <= num_vectors:
            raise ValueError(f"num_vectors={num_vectors} leaves no room for demonstrations in the distiller's "
                             f"{limit} positions")
        self.max_input = limit - num_vectors if limit is not None else None
        # Identity when sizes match: a projector there would only add parameters to train.
        self.projector = nn.Sequential(nn.Linear(d, d_llm), nn.Tanh()) if d != d_llm else nn.Identity()

    @property
    def num_vectors(self) -> int:
        return self.placeholders.shape[0]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, L] left-padded demonstration ids -> [B, K, d_llm] vectors."""
        batch, k = input_ids.shape[0], self.num_vectors
        if self.max_input is not None and input_ids.shape[1] > self.max_input:
            input_ids, attention_mask = input_ids[:, -self.max_input:], attention_mask[:, -self.max_input:]
        embeds = self.body.get_input_embeddings()(input_ids)
        slots = self.placeholders.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
        embeds = torch.cat([embeds, slots], dim=1)
        mask = torch.cat([attention_mask, attention_mask.new_ones(batch, k)], dim=1)
        kwargs = {}
        if self.causal:
            kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = self.body(inputs_embeds=embeds, attention_mask=mask, **kwargs).last_hidden_state
        # Placeholders and projector stay float32 whatever the body's dtype.
        return self.projector(hidden[:, -k:].to(self.placeholders.dtype))
