"""Tier 0: L1's init starts the static-key pin (kvmpy/nested/keypin.py) from its own text, before
any test can start a VM, and waits for it; a broken embedding or ordering fails here, not as a
wedged L1 twenty minutes into a CI run."""
from __future__ import annotations

import re
from pathlib import Path

from kvmpy.nested import initscripts, keypin


def _embedded_script(init: str) -> str:
    start = init.index(f"<<'{initscripts.KEYPIN_EOF}'\n") + len(initscripts.KEYPIN_EOF) + 5
    end = init.index(f"\n{initscripts.KEYPIN_EOF}\n", start)
    return init[start:end + 1]


def test_l1_init_embeds_keypin_verbatim():
    assert _embedded_script(initscripts.L1_INIT) == Path(keypin.__file__).read_text()
    compile(_embedded_script(initscripts.L1_INIT), "keypin.py", "exec")


def test_l1_init_holds_the_keys_before_it_reports_ready_and_runs_the_command():
    init = initscripts.L1_INIT
    start = init.index("python3 -I /run/kvmpy-keypin.py /run/kvmpy-keypin.held")
    wait = init.index("while [ ! -e $R/run/kvmpy-keypin.held ]", start)
    assert init.index("mount -t devtmpfs devtmpfs $R/dev") < start  # /dev/kvm in the chroot
    assert init.index("mount -t tmpfs tmpfs $R/run") < start         # where the script goes
    assert wait < init.index(initscripts.L1_READY_MARKER) < init.index("cmd.sh")
    # the pin runs in the background and the init goes on; its outcome is one console line
    assert re.search(r"/run/kvmpy-keypin.held' </dev/null &\n", init)
    assert f"echo \"{initscripts.L1_KEYPIN_MARKER} failed" in init


def test_keypin_names_every_key_it_holds_and_needs_no_kvmpy():
    source = Path(keypin.__file__).read_text()
    # the chroot's python3 -I runs it before the harness's environment exists
    assert not re.search(r"^\s*(from|import) kvmpy", source, re.M)
    assert set(keypin.KEYS) == {"preempt_notifier_key", "apic_sw_disabled",
                                "apic_hw_disabled", "kvm_has_noapic_vcpu"}


def test_hold_keys_without_kvm_names_the_device(tmp_path):
    fds, held, failures = keypin.hold_keys(str(tmp_path / "no-kvm"))
    assert (fds, held) == ([], [])
    assert failures == [f"{tmp_path / 'no-kvm'}: No such file or directory"]
