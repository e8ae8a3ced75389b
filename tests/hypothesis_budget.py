"""Example budgets that follow the hypothesis profile (tests/conftest.py): `examples(300)` is 300
under dev and ci, 20x that under `HYPOTHESIS_PROFILE=long`."""
from __future__ import annotations

from hypothesis import settings


def examples(n: int) -> int:
    """n scaled by the loaded profile's max_examples against hypothesis' default of 100."""
    return max(1, n * settings.default.max_examples // 100)
