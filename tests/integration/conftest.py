from __future__ import annotations

import pytest

from dspark.target import Target


@pytest.fixture(scope="session")
def gemma_fp32() -> Target:
    """The real embedded Gemma 3 270M in fp32 (converted on first use, then ~5 s)."""
    return Target.load("gemma3-270m", dtype="float32")
