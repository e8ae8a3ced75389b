"""Suite-wide setup: the skip allow-list (tests/skipcheck.py) and hypothesis profiles.

Profiles (HYPOTHESIS_PROFILE=..., or CI=true for "ci"):
  dev   the default locally: random examples, failures saved to .hypothesis/examples and replayed
  ci    the same saved database, but every property test runs a fixed seed derived from its test
        id, so a CI run is reproducible (and a failure prints the blob to replay it)
  long  20x the examples of every budget written with hypothesis_budget.examples(n), for local
        hunting: `make test HYPOTHESIS_PROFILE=long`
hypothesis is imported only where its plugin is loaded (tier 2 runs in L1 without it: slow imports).
"""
from __future__ import annotations

import os
import zlib
from pathlib import Path

import pytest

from skipcheck import (pytest_addoption, pytest_runtest_logreport, pytest_sessionfinish,  # noqa: F401
                       pytest_terminal_summary)

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_DB = REPO_ROOT / ".hypothesis" / "examples"
PROFILE_FACTORS = {"dev": 1, "ci": 1, "long": 20}


def hypothesis_profile_name() -> str:
    name = os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") == "true" else "dev")
    if name not in PROFILE_FACTORS:
        raise pytest.UsageError(f"HYPOTHESIS_PROFILE={name!r}: expected one of {', '.join(PROFILE_FACTORS)}")
    return name


def _hypothesis_loaded(config: pytest.Config) -> bool:
    return config.pluginmanager.has_plugin("hypothesispytest")


@pytest.hookimpl(tryfirst=True)  # before hypothesis' plugin loads a --hypothesis-profile
def pytest_configure(config: pytest.Config) -> None:
    if not _hypothesis_loaded(config):
        return
    from hypothesis import HealthCheck, settings
    from hypothesis.database import DirectoryBasedExampleDatabase
    database = DirectoryBasedExampleDatabase(EXAMPLE_DB)
    base = dict(database=database, deadline=None)
    settings.register_profile("dev", **base)
    settings.register_profile("ci", **base, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("long", **base, max_examples=100 * PROFILE_FACTORS["long"])
    if config.getoption("--hypothesis-profile", default=None) is None:
        settings.load_profile(hypothesis_profile_name())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under the ci profile every property test gets `@seed(crc32(test id))`: its examples are
    the same in every run, while failures saved in the example database are still replayed first
    (derandomize=True would switch the database off)."""
    if not _hypothesis_loaded(config) or hypothesis_profile_name() != "ci":
        return
    from hypothesis import seed
    for item in items:
        test = getattr(item, "obj", None)
        if getattr(test, "is_hypothesis_test", False):
            seed(zlib.crc32(item.nodeid.split("[")[0].encode()))(test)
