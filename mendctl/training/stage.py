"""A training stage: what differs between stage 1 (pretrain) and stage 2 (finetune), in one place.

The trainer runs the same loop for both; whatever it would otherwise decide by comparing the stage's
name is decided here, once, when the stage is built from the recipe.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..core.config import FinetuneSpec, PretrainSpec, Recipe
from ..data.workspace import finetune_start
from .examples import example_source

STAGES = ("pretrain", "finetune")


@dataclass(frozen=True)
class Stage:
    name: str  # the recipe section, the command and the output folder's name
    spec: PretrainSpec | FinetuneSpec
    recipe: Recipe = field(repr=False)
    out: Path
    ce_weight: float
    kl_weight: float
    # Distiller weights loaded over the initial ones; None: the stage starts from the initial distiller.
    start_from: Path | None
    # The stage whose output it would start from by default, to say so when that output is missing.
    follows: str | None
    # Stage 2's examples end in a target output: the student's CE and ICL's on it are measured, logged
    # and shown even at ce_weight 0. Stage 1's target is only the rest of a text: the KL says it all.
    measures_ce: bool
    # What the KL compares (finetune.kl_on): next-token distributions at every query token ("query"), at
    # the output's alone ("output"), or the distributions over the example's options ("options").
    kl_on: str = "query"

    @property
    def reads_teacher_cache(self) -> bool:
        """The cache holds the teacher's next-token distributions, which the option KL does not compare."""
        return self.spec.teacher_cache and self.kl_on != "options"

    @property
    def checkpoints(self) -> Path:
        return self.out / "checkpoints"

    def examples(self, models, template):
        """Example p of the stage, a pure function of (seed, p); the teacher-cache filler reads the same."""
        return example_source(self.name, self.recipe, models.llm_tokenizer, models.llm.is_encoder_decoder, template)


def build_stage(recipe: Recipe, name: str) -> Stage:
    if name not in STAGES:
        raise ValueError(f"no training stage {name!r}: one of {', '.join(STAGES)}")
    spec = getattr(recipe, name)
    if spec is None:
        raise ValueError(f"the recipe has no `{name}` section")
    if name == "pretrain":
        # Stage 1 has no target outputs worth a CE term: it learns the teacher's distributions alone.
        return Stage(name, spec, recipe, recipe.stage_dir(name), ce_weight=0.0, kl_weight=1.0, start_from=None,
                     follows=None, measures_ce=False)
    return Stage(name, spec, recipe, recipe.stage_dir(name), ce_weight=spec.ce_weight, kl_weight=spec.kl_weight,
                 start_from=finetune_start(recipe), follows="pretrain", measures_ce=True,
                 kl_on=spec.kl_on)
