"""The QEMU that runs L1 on this host (L0): bookworm-backports' qemu-system-x86 (10.0), fetched with
apt into the cache beside the kernel package, rather than the system's QEMU 7.2.

Why: under 7.2's TCG, L1 (nested SVM, kvm_amd) lost interrupts and corrupted memory under the
tier-2 guests. Signatures: a kvmpy vCPU thread's stack guard page hit in error_entry ("corrupted
stack end detected inside scheduler"); both L1 CPUs halted for good, one of them with IF=1 and
vectors pending above its PPR (a wakeup never delivered; watch.interrupt_state shows it); a guest
whose vCPUs stopped (RCU stall) while L1 lived on. The migration-faults file
(tests/tier2/test_kvmpy_migration_faults.py; its link-down fault most of all) was the quickest
trigger. Measured here, 2026-12-01: that file under 7.2 failed 4 of 5 runs (with kvm_amd.vgif=0
and with the BPF JIT off too), its link-down test alone 2 of 3; under 10.0 the file failed 1 of 4
(one such panic) and link-down alone passed 5 of 5. Better, not cured: tier2driver still reruns
what a wedged L1 took down. The system's QEMU stays the reference VMM tier 2 runs *inside* L1 (on
KVM, where TCG plays no part).

The packages are unpacked (dpkg-deb -x), never installed: nothing on the host changes; apt's
state for the one extra suite lives in the cache too. A cached unpack is reused without the
network; KVMPY_L1_QEMU names another binary (experiments); when the fetch fails, L1 runs on the
system's QEMU after one warning line that says what that risks.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from kvmpy.errors import NestedError
from kvmpy.nested.kernel import cache_root

log = logging.getLogger(__name__)

SYSTEM_QEMU = "qemu-system-x86_64"
SUITE = "bookworm-backports"
MIRROR = "http://deb.debian.org/debian"
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
PACKAGES = ("qemu-system-x86", "qemu-system-data")    # the binary; its option ROMs (pvh.bin, ...)
KNOWN_GOOD = "1:10.0.2+ds-2+deb13u1~bpo12+1"          # the version tier 2 was verified with
SYSTEM_DATA = "/usr/share/qemu"                        # seabios' bios-256k.bin is linked from here
_VERSION_RE = re.compile(r"QEMU emulator version (\d+)\.(\d+)")
MIN_MAJOR = 8


@dataclass(frozen=True)
class L1Qemu:
    """A QEMU binary and the firmware directories it needs (-L, searched in order)."""

    binary: str
    datadirs: tuple[str, ...] = ()
    origin: str = "system"          # "backports <version>", "KVMPY_L1_QEMU" or "system"

    def argv(self) -> list[str]:
        words = [self.binary]
        for d in self.datadirs:
            words += ["-L", d]
        return words


def qemu_dir() -> Path:
    return cache_root() / "qemu"


def l1_qemu(fetch: bool = True) -> L1Qemu:
    """The QEMU for L1: KVMPY_L1_QEMU, else the cached backport, else (with `fetch`) a fresh
    one, else the system's with a warning."""
    explicit = os.environ.get("KVMPY_L1_QEMU")
    if explicit:
        return L1Qemu(explicit, origin="KVMPY_L1_QEMU")
    cached = cached_backport(qemu_dir())
    if cached is not None:
        return cached
    why = "not fetched"
    if fetch:
        try:
            return fetch_backport(qemu_dir())
        except NestedError as exc:
            why = str(exc)
    log.warning("L1 runs on the system's QEMU (%s): %s's qemu-system-x86 is %s; under 7.2's TCG, L1 "
                "has corrupted guests and panicked (kvmpy/nested/l0qemu.py)", SYSTEM_QEMU, SUITE, why)
    return L1Qemu(SYSTEM_QEMU)


def _unpacked(root: Path) -> L1Qemu | None:
    binary = root / "usr" / "bin" / SYSTEM_QEMU
    if not binary.is_file():
        return None
    return L1Qemu(str(binary), (str(root / "usr" / "share" / "qemu"), SYSTEM_DATA),
                  origin=f"{SUITE} {root.parent.name}")


def cached_backport(directory: Path) -> L1Qemu | None:
    """The newest complete unpack under `directory` (its `<version>/root`; `<version>/ok` is
    written last, so a half-done unpack is never used)."""
    done = sorted((p.parent for p in directory.glob("*/ok")), key=lambda p: p.stat().st_mtime)
    for version_dir in reversed(done):
        found = _unpacked(version_dir / "root")
        if found is not None:
            return found
    return None


def _apt(words: list[str], state: Path, cwd: Path | None = None, timeout: float = 600) -> str:
    """apt-get/apt-cache with only SUITE as its sources and its state under `state`."""
    options = [f"Dir::Etc::SourceList={state / 'sources.list'}", "Dir::Etc::SourceParts=/dev/null",
               f"Dir::State::Lists={state / 'lists'}", f"Dir::Cache={state / 'cache'}",
               "Dir::Cache::pkgcache=", "Dir::Cache::srcpkgcache=", "APT::Sandbox::User=root"]
    argv = [words[0]] + [w for o in options for w in ("-o", o)] + words[1:]
    try:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise NestedError(f"fetching {SUITE}'s QEMU", detail=f"{words[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise NestedError(f"fetching {SUITE}'s QEMU", detail=f"{' '.join(words[:2])} timed out") from None
    if proc.returncode != 0:
        raise NestedError(f"fetching {SUITE}'s QEMU", detail=f"{' '.join(words[:2])} exited "
                          f"{proc.returncode}: {proc.stderr.strip()[-300:]}")
    return proc.stdout


def candidate_version(policy: str) -> str | None:
    """`apt-cache policy`'s Candidate line, or None."""
    m = re.search(r"^\s*Candidate:\s*(\S+)", policy, re.M)
    return m.group(1) if m and m.group(1) != "(none)" else None


def _has_version(state: Path, version: str) -> bool:
    try:
        return bool(_apt(["apt-cache", "show", f"{PACKAGES[0]}={version}"], state).strip())
    except NestedError:
        return False


def fetch_backport(directory: Path) -> L1Qemu:
    """Download PACKAGES from SUITE (KNOWN_GOOD when the suite still has it, else its current
    version), unpack them under `directory/<version>/root` and check the binary runs."""
    state = directory / "apt"
    (state / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    (state / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    signed = f"[signed-by={KEYRING}] " if KEYRING.is_file() else ""
    (state / "sources.list").write_text(f"deb {signed}{MIRROR} {SUITE} main\n")
    _apt(["apt-get", "update", "-qq"], state)
    available = candidate_version(_apt(["apt-cache", "policy", PACKAGES[0]], state))
    if available is None:
        raise NestedError(f"fetching {SUITE}'s QEMU", detail=f"{SUITE} has no {PACKAGES[0]}")
    version = KNOWN_GOOD if available == KNOWN_GOOD or _has_version(state, KNOWN_GOOD) else available
    if version != KNOWN_GOOD:
        log.warning("%s no longer has QEMU %s; L1 runs on its %s (not yet verified with tier 2)",
                    SUITE, KNOWN_GOOD, version)
    version_dir = directory / re.sub(r"[^A-Za-z0-9.+~-]", "_", version)
    debs = version_dir / "debs"
    shutil.rmtree(version_dir, ignore_errors=True)
    debs.mkdir(parents=True)
    _apt(["apt-get", "download", "-qq", *(f"{p}={version}" for p in PACKAGES)], state, cwd=debs)
    root = version_dir / "root"
    for deb in sorted(debs.glob("*.deb")):
        try:
            subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True, capture_output=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as exc:
            raise NestedError(f"unpacking {deb.name}", detail=str(exc)[-300:]) from None
    found = _unpacked(root)
    if found is None:
        raise NestedError(f"unpacking {SUITE}'s QEMU", detail=f"no {SYSTEM_QEMU} in {root}")
    check_runs(found)
    shutil.rmtree(debs, ignore_errors=True)
    (version_dir / "ok").write_text(version + "\n")
    log.info("L1's QEMU: %s (%s)", found.binary, version)
    return found


def check_runs(qemu: L1Qemu) -> int:
    """The binary starts here (its libraries resolve) and is at least MIN_MAJOR; its major."""
    try:
        proc = subprocess.run([qemu.binary, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise NestedError(f"running {qemu.binary}", detail=str(exc)[-300:]) from None
    m = _VERSION_RE.search(proc.stdout)
    if proc.returncode != 0 or m is None:
        raise NestedError(f"running {qemu.binary} --version",
                          detail=(proc.stderr.strip() or proc.stdout.strip())[-300:])
    if int(m.group(1)) < MIN_MAJOR:
        raise NestedError(f"running {qemu.binary}", detail=f"QEMU {m.group(1)}.{m.group(2)} is older than "
                          f"{MIN_MAJOR}.0")
    return int(m.group(1))
