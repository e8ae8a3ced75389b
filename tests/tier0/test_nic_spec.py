"""--nic parsing (QEMU's -nic shorthand): options, `,,` escaping, default MACs, one-line errors."""
import pytest
from hypothesis import given, strategies as st

from kvmpy.devices.virtio.netspec import (NicSpec, check_mac, default_mac, parse_nic_spec,
                                          split_qemu_options)
from kvmpy.errors import ConfigError


def test_full_spec():
    spec = parse_nic_spec("tap,ifname=tap7,br=br0,mac=52:54:00:AB:CD:EF,vhost=on,queues=4")
    assert spec == NicSpec("tap7", "br0", "52:54:00:ab:cd:ef", "on", 4)
    assert spec.mac_bytes() == bytes.fromhex("525400abcdef")


def test_defaults_and_stable_mac():
    a, b = parse_nic_spec("tap", 0), parse_nic_spec("tap", 1)
    assert a.vhost == "auto" and a.queues == 1 and a.ifname == "" and a.bridge == ""
    assert a.mac == parse_nic_spec("tap", 0).mac and a.mac != b.mac
    first = int(a.mac[:2], 16)
    assert first & 2 and not first & 1  # locally administered, unicast
    assert parse_nic_spec("tap,ifname=t0").mac == default_mac("t0", 0)


def test_double_comma_escapes():
    assert split_qemu_options("tap,ifname=a,,b,,,br=c") == ["tap", "ifname=a,b,", "br=c"]
    assert split_qemu_options("") == [""]


@given(st.lists(st.text(alphabet="ab,=", min_size=1, max_size=6), min_size=1, max_size=5))
def test_escaping_round_trips(values):
    text = ",".join(v.replace(",", ",,") for v in values)
    # a value ending or starting with "," next to a separator is ambiguous in QEMU's syntax too
    if any(v.endswith(",") or v.startswith(",") for v in values[:-1] + values[1:]):
        return
    assert split_qemu_options(text) == values


@pytest.mark.parametrize("text, words", [
    ("user", "only tap"),
    ("ifname=x", "must start"),
    ("tap,foo=1", "unknown option"),
    ("tap,ifname", "not key=value"),
    ("tap,ifname=a,ifname=b", "twice"),
    ("tap,mac=52:54:00:12:34", "six hex bytes"),
    ("tap,mac=53:54:00:12:34:56", "multicast"),
    ("tap,mac=00:00:00:00:00:00", "station"),
    ("tap,mac=zz:54:00:12:34:56", "six hex bytes"),
    ("tap,vhost=maybe", "vhost"),
    ("tap,queues=0", "queues"),
    ("tap,queues=99", "queues"),
    ("tap,queues=two", "not a number"),
    ("tap,ifname=" + "x" * 16, "interface name"),
    ("tap,br=a b", "interface name"),
    ("tap,ifname=a/b", "interface name"),
    ("tap,model=e1000", "virtio-net-pci"),
])
def test_one_line_errors(text, words):
    with pytest.raises(ConfigError) as e:
        parse_nic_spec(text)
    msg = str(e.value)
    assert words in msg and "\n" not in msg and msg.startswith("parsing --nic")


@given(st.text(max_size=40))
def test_any_text_parses_or_config_error(text):
    try:
        spec = parse_nic_spec(text)
    except ConfigError:
        return
    check_mac(spec.mac)
    assert 1 <= spec.queues <= 8
