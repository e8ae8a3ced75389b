"""The README's in-process API example runs as written (docs that drift are bugs too)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_readme_api_example_runs(kvm_available):
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    example = next(b for b in blocks if "from kvmpy import Machine" in b)
    proc = subprocess.run([sys.executable, "-c", example], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert re.fullmatch(r"[0-9a-f]{8}", lines[0]) and lines[1].startswith("saved at count")
    assert lines[2].startswith("running ") and "status=0" in lines[3]


def test_a_hook_on_a_device_port_is_refused_by_name(kvm_available):
    import pytest
    from kvmpy import Machine
    from kvmpy.errors import BusError
    with Machine(kernel=str(ROOT / "tests/guest/out/counter.elf"), memory="64M") as m:
        m.add_pio_hook(0x3F8, 1)
        with pytest.raises(BusError, match="overlaps"):
            m.start()
        assert m.board is None and m.status == "prelaunch"
