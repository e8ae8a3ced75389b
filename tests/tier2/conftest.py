"""Tier 2: real Linux guests under real (hardware-style) KVM.

Tests here run inside the nested L1 harness or on a host with vmx/svm; elsewhere (a PVM host
outside the harness) they skip and say to use `make test-tier2`. Fixtures give the stock Debian
bzImage, image builders and a guest runner whose serial log is attached to failure reports.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import pytest

from kvmpy.nested import tier2
from kvmpy.nested.kernel import KernelPackage, cache_root, unpack

_GUEST_RUNS = pytest.StashKey[list]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "tier2: needs a real Linux guest under hardware KVM")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    blocked = tier2.tests_can_run_here()
    for item in items:
        if here not in Path(str(item.fspath)).parents:
            continue
        item.add_marker(pytest.mark.tier2)
        if blocked is not None:
            item.add_marker(pytest.mark.skip(
                reason=f"tier 2 cannot run in this process ({blocked.reason}); "
                       "run it with `make test-tier2`"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        for name, run in item.stash.get(_GUEST_RUNS, []):
            status = "timed out" if run.timed_out else f"exit status {run.exit_status}"
            report.sections.append(
                (f"guest log: {name} ({status}, {run.elapsed_s:.1f}s)", run.tail(80)))


@pytest.fixture(scope="session")
def kernel_package() -> KernelPackage:
    """The unpacked Debian 6.1 kernel package (same one L1 runs)."""
    return unpack()


@pytest.fixture(scope="session")
def stock_bzimage(kernel_package: KernelPackage) -> Path:
    return kernel_package.bzimage


@pytest.fixture(scope="session")
def build_initramfs(kernel_package: KernelPackage) -> Callable[..., Path]:
    """build_initramfs(script=None, modules=GUEST_MODULES, files=None) -> cached .cpio.gz."""
    from kvmpy.nested.images import GUEST_MODULES, build_guest_initramfs

    def build(script: str | None = None, modules=GUEST_MODULES, files=None) -> Path:
        return build_guest_initramfs(kernel_package, script=script, modules=modules, files=files)
    return build


@pytest.fixture(scope="session")
def build_ext4() -> Callable[..., Path]:
    """build_ext4(files: {path: bytes|str|Path}, size_mib=16, label='kvmpy') -> cached image."""
    from kvmpy.nested.images import build_ext4 as build
    return build


@pytest.fixture
def run_guest(request: pytest.FixtureRequest) -> Callable[..., tier2.GuestRun]:
    """run_guest(argv, timeout_s=120, name=None) -> GuestRun; the serial log is saved under
    .cache/nested/logs/tier2/ and shown in the report if the test fails."""
    runs: list = request.node.stash.setdefault(_GUEST_RUNS, [])

    def run(argv: list[str], timeout_s: float = 120.0, name: str | None = None,
            rerun_livelock: bool = True) -> tier2.GuestRun:
        label = name or f"guest{len(runs)}"
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{request.node.name}-{label}")
        result = tier2.run_guest(argv, timeout_s=timeout_s, rerun_livelock=rerun_livelock,
                                 log_path=cache_root() / "logs" / "tier2" / f"{safe}.log")
        runs.append((label, result))
        return result
    return run
