"""`kvmpy info` and `kvmpy bench exits` against the real /dev/kvm."""
from __future__ import annotations

import json

from kvmpy.cli import main


def test_info_json_lists_the_capabilities(kvm_available, capsys):
    assert main(["info", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["api_version"] == 12
    assert facts["capabilities"]["user_memory"] and facts["capabilities"]["ioeventfd"]
    assert facts["kind"] in ("pvm", "hardware")


def test_bench_exits_reports_both_implementations(kvm_available, capsys):
    assert main(["bench", "exits", "--count", "300"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["io_exits"] == 300 and result["exits"] == 301
    assert result["c"]["io_exits"] == 300
    assert result["us_per_exit"] > 0 and result["ratio_vs_c"] > 0
