"""Tier 0: which QEMU runs L1 (kvmpy.nested.l0qemu): the cached backport, a fresh fetch through
apt with only bookworm-backports as its source (fake apt-get, apt-cache and dpkg-deb on PATH),
and the system's QEMU, with a warning, when the fetch fails."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from kvmpy.errors import NestedError
from kvmpy.nested import l0qemu

FAKE_QEMU = "#!/bin/sh\necho 'QEMU emulator version {version} (fake)'\n"


def _script(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


def fake_tools(bin_dir: Path, candidate: str, known_good_listed: bool = True,
               qemu_version: str = "10.0.2", update_fails: bool = False) -> Path:
    """apt-get/apt-cache/dpkg-deb stand-ins; every call is logged (one line of argv each)."""
    bin_dir.mkdir()
    calls = bin_dir / "calls.log"
    show = "exit 0" if known_good_listed else "exit 100"
    _script(bin_dir / "apt-get", f"""#!/bin/sh
echo "apt-get $*" >> {calls}
case "$*" in
  *" update "*) {"echo 'E: no network' >&2; exit 100" if update_fails else "exit 0"} ;;
  *" download "*) for w in "$@"; do case "$w" in qemu-*=*) touch "${{w%%=*}}_fake.deb" ;; esac; done ;;
esac
""")
    _script(bin_dir / "apt-cache", f"""#!/bin/sh
echo "apt-cache $*" >> {calls}
case "$*" in
  *" policy "*) printf 'qemu-system-x86:\\n  Installed: 1:7.2\\n  Candidate: {candidate}\\n' ;;
  *" show "*) echo "Package: qemu-system-x86"; {show} ;;
esac
""")
    _script(bin_dir / "dpkg-deb", f"""#!/bin/sh
echo "dpkg-deb $*" >> {calls}
mkdir -p "$3/usr/bin" "$3/usr/share/qemu"
printf '%s' "{FAKE_QEMU.format(version=qemu_version)}" > "$3/usr/bin/qemu-system-x86_64"
chmod +x "$3/usr/bin/qemu-system-x86_64"
""")
    return calls


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.delenv("KVMPY_L1_QEMU", raising=False)
    monkeypatch.setattr(l0qemu, "qemu_dir", lambda: tmp_path / "qemu")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    return tmp_path


def test_a_fresh_fetch_takes_the_known_good_version_and_unpacks_without_installing(env):
    calls = fake_tools(env / "bin", candidate="1:10.1.0~bpo12+1")
    qemu = l0qemu.l1_qemu()
    assert qemu.binary.endswith("/root/usr/bin/qemu-system-x86_64") and Path(qemu.binary).is_file()
    assert qemu.argv()[1:] == ["-L", str(Path(qemu.binary).parents[1] / "share" / "qemu"),
                               "-L", l0qemu.SYSTEM_DATA]
    log = calls.read_text()
    assert f"qemu-system-x86={l0qemu.KNOWN_GOOD} qemu-system-data={l0qemu.KNOWN_GOOD}" in log
    assert "install" not in log and "Dir::State::Lists=" in log and "Dir::Etc::SourceParts=/dev/null" in log
    sources = (env / "qemu" / "apt" / "sources.list").read_text()
    assert sources.startswith("deb ") and "bookworm-backports main" in sources
    # the second call uses the unpack: no apt at all
    calls.write_text("")
    assert l0qemu.l1_qemu() == qemu and calls.read_text() == ""


def test_a_suite_without_the_known_good_version_gives_its_current_one(env, caplog):
    fake_tools(env / "bin", candidate="1:10.2.0+ds-1~bpo12+1", known_good_listed=False)
    with caplog.at_level(logging.WARNING, logger="kvmpy.nested.l0qemu"):
        qemu = l0qemu.l1_qemu()
    assert "1_10.2.0+ds-1~bpo12+1" in qemu.binary
    assert "not yet verified" in caplog.text


@pytest.mark.parametrize("breakage", ["update", "old"])
def test_a_failed_fetch_falls_back_to_the_system_qemu_with_one_warning(env, caplog, breakage):
    fake_tools(env / "bin", candidate=l0qemu.KNOWN_GOOD, update_fails=breakage == "update",
               qemu_version="7.2.22")
    with caplog.at_level(logging.WARNING, logger="kvmpy.nested.l0qemu"):
        qemu = l0qemu.l1_qemu()
    assert qemu == l0qemu.L1Qemu(l0qemu.SYSTEM_QEMU) and qemu.argv() == [l0qemu.SYSTEM_QEMU]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "system's QEMU" in warnings[0].getMessage()
    assert ("no network" if breakage == "update" else "older than 8.0") in warnings[0].getMessage()
    # a half-done unpack (no `ok`) is never taken for a cached one
    assert l0qemu.cached_backport(env / "qemu") is None


def test_the_environment_names_another_binary(env, monkeypatch):
    monkeypatch.setenv("KVMPY_L1_QEMU", "/opt/qemu/bin/qemu-system-x86_64")
    assert l0qemu.l1_qemu(fetch=False).argv() == ["/opt/qemu/bin/qemu-system-x86_64"]


def test_candidate_lines():
    assert l0qemu.candidate_version("x:\n  Installed: 1\n  Candidate: 1:10.0.2+ds-2\n") == "1:10.0.2+ds-2"
    assert l0qemu.candidate_version("x:\n  Candidate: (none)\n") is None
    assert l0qemu.candidate_version("") is None


def test_check_runs_names_what_failed(tmp_path):
    broken = tmp_path / "qemu"
    _script(broken, "#!/bin/sh\necho 'error while loading shared libraries: libfoo.so' >&2; exit 127\n")
    with pytest.raises(NestedError, match="libfoo"):
        l0qemu.check_runs(l0qemu.L1Qemu(str(broken)))
