"""Drafters by name. Later drafters (dspark, dflash, eagle3) register here too."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dspark.drafters.base import Drafter, DraftState, Proposal
from dspark.drafters.ngram import NgramDrafter
from dspark.drafters.eagle3 import Eagle3Drafter
from dspark.drafters.linked import DraftConfig, LinkedDrafter
from dspark.drafters.parallel import ParallelDrafter
from dspark.drafters.vocab import DraftVocab


def _dflash(target: Any, **kw: Any) -> ParallelDrafter:
    return ParallelDrafter.for_target(target, "dflash", **kw)


def _dspark(target: Any, **kw: Any) -> ParallelDrafter:
    return ParallelDrafter.for_target(target, "dspark", **kw)


def _eagle3(target: Any, **kw: Any) -> Eagle3Drafter:
    return Eagle3Drafter.for_target(target, "eagle3", **kw)


def _ngram(target: Any = None, **kw: Any) -> NgramDrafter:
    return NgramDrafter(**kw)


# name -> factory(target, **options) building a fresh (untrained) drafter
REGISTRY: dict[str, Callable[..., Drafter]] = {"ngram": _ngram, "dflash": _dflash, "dspark": _dspark, "eagle3": _eagle3}


def build_drafter(name: str, target: Any = None, **kwargs: Any) -> Drafter:
    """A fresh drafter by registry name (``ngram``, ``dflash``, ``dspark``, ``eagle3``)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown drafter {name!r}; known: {sorted(REGISTRY)}")
    if name != "ngram" and target is None:
        raise ValueError(f"drafter {name!r} is built for a target: pass target=")
    return REGISTRY[name](target, **kwargs)


def load_drafter(path: str, target: Any) -> Drafter:
    """Load a saved drafter checkpoint (any kind) and attach it to ``target``."""
    from dspark.drafters.checkpoint import load_drafter as _load

    return _load(path, target)


__all__ = [
    "Drafter",
    "DraftState",
    "Proposal",
    "NgramDrafter",
    "ParallelDrafter",
    "Eagle3Drafter",
    "LinkedDrafter",
    "DraftConfig",
    "DraftVocab",
    "REGISTRY",
    "build_drafter",
    "load_drafter",
]
