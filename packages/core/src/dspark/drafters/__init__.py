"""Drafters by name. Later drafters (dspark, dflash, eagle3) register here too."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dspark.drafters.base import Drafter, DraftState, Proposal
from dspark.drafters.ngram import NgramDrafter

REGISTRY: dict[str, Callable[..., Drafter]] = {"ngram": NgramDrafter}


def build_drafter(name: str, **kwargs: Any) -> Drafter:
    if name not in REGISTRY:
        raise ValueError(f"unknown drafter {name!r}; known: {sorted(REGISTRY)}")
    return REGISTRY[name](**kwargs)


__all__ = ["Drafter", "DraftState", "Proposal", "NgramDrafter", "REGISTRY", "build_drafter"]
