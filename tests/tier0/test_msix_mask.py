"""MSI-X delivery against a model of the PCI spec's rules (6.8.2): a message goes out only while
MSI-X is enabled, the function mask is clear and the vector is unmasked; otherwise the vector's
pending bit is set, and the message goes out once when the last mask holding it is cleared."""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

from hypothesis import given, settings, strategies as st

from kvmpy.devices.pci import MsixCapability, PciFunction

from hypothesis_budget import examples

VECTORS = 4
ENABLE, FUNCTION_MASK = 0x8000, 0x4000


class RecordingSink:
    def __init__(self) -> None:
        self.messages: list[tuple[int, int]] = []

    def signal_msi(self, address: int, data: int) -> None:
        self.messages.append((address, data))


class Function(PciFunction):
    """A function with MSI-X in BAR 0: table at 0, PBA at 0x800; config writes reach the cap."""

    def __init__(self, sink: RecordingSink):
        super().__init__("msix-test", 0x1AF4, 0x1000, 0xFF0000)
        self.add_bar(0, 0x1000, is64=False)
        self.msix = MsixCapability(self, VECTORS, 0, 0x0, 0x800, sink)

    def _config_written(self, offset: int, size: int, value: int) -> None:
        self.msix.control_written()

    def set_control(self, enable: bool, function_mask: bool) -> None:
        self.config_write(self.msix.cap_offset + 2, 2, (ENABLE if enable else 0) | (FUNCTION_MASK if function_mask else 0))

    def pba(self) -> int:
        return int.from_bytes(self.msix.pba_read(0, 8), "little")


@dataclass
class Model:
    enabled: bool = False
    function_masked: bool = False
    masked: list[bool] = field(default_factory=lambda: [True] * VECTORS)   # reset: every vector masked
    messages: list[tuple[int, int]] = field(default_factory=lambda: [(0, 0)] * VECTORS)
    pending: set[int] = field(default_factory=set)
    sent: list[tuple[int, int]] = field(default_factory=list)

    def release(self) -> None:
        if self.enabled and not self.function_masked:
            for v in sorted(self.pending):
                if not self.masked[v]:
                    self.pending.discard(v)
                    self.sent.append(self.messages[v])

    def notify(self, v: int) -> bool:
        if not self.enabled:
            return False
        if self.function_masked or self.masked[v]:
            self.pending.add(v)
        else:
            self.sent.append(self.messages[v])
        return True


def setup() -> tuple[Function, RecordingSink]:
    sink = RecordingSink()
    return Function(sink), sink


def program(fn: Function, v: int, address: int, data: int, masked: bool) -> None:
    fn.msix.table_write(16 * v, struct.pack("<Q", address))
    fn.msix.table_write(16 * v + 8, struct.pack("<I", data))
    fn.msix.table_write(16 * v + 12, struct.pack("<I", int(masked)))


def test_function_mask_holds_an_unmasked_vector():
    fn, sink = setup()
    program(fn, 1, 0xFEE0_1000, 0x41, masked=False)
    fn.set_control(enable=True, function_mask=True)
    assert fn.msix.notify(1) is True
    assert sink.messages == [] and fn.pba() == 0b10, "the function mask must hold the message"
    fn.set_control(enable=True, function_mask=False)
    assert sink.messages == [(0xFEE0_1000, 0x41)] and fn.pba() == 0
    fn.set_control(enable=True, function_mask=False)   # nothing pending: nothing more
    assert len(sink.messages) == 1


def test_vector_mask_holds_and_unmask_releases_once():
    fn, sink = setup()
    program(fn, 2, 0xFEE0_2000, 0x42, masked=True)
    fn.set_control(enable=True, function_mask=False)
    assert fn.msix.notify(2) and fn.msix.notify(2)      # two signals while masked: one pending bit
    assert sink.messages == [] and fn.pba() == 0b100
    fn.msix.table_write(16 * 2 + 12, struct.pack("<I", 0))
    assert sink.messages == [(0xFEE0_2000, 0x42)] and fn.pba() == 0


def test_disabled_msix_sends_nothing_and_asks_for_intx():
    fn, sink = setup()
    program(fn, 0, 0xFEE0_0000, 0x40, masked=False)
    fn.set_control(enable=False, function_mask=False)
    assert fn.msix.notify(0) is False and sink.messages == [] and fn.pba() == 0


op = st.one_of(
    st.tuples(st.just("control"), st.booleans(), st.booleans()),
    st.tuples(st.just("mask"), st.integers(0, VECTORS - 1), st.booleans()),
    st.tuples(st.just("message"), st.integers(0, VECTORS - 1), st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1)),
    st.tuples(st.just("notify"), st.integers(0, VECTORS - 1)),
    st.tuples(st.just("notify"), st.integers(0, VECTORS - 1)),
)


@settings(max_examples=examples(300), deadline=None)
@given(ops=st.lists(op, max_size=40))
def test_delivery_matches_the_spec_model(ops):
    fn, sink = setup()
    model = Model()
    for o in ops:
        kind = o[0]
        if kind == "control":
            fn.set_control(o[1], o[2])
            model.enabled, model.function_masked = o[1], o[2]
            model.release()
        elif kind == "mask":
            _, v, masked = o
            fn.msix.table_write(16 * v + 12, struct.pack("<I", int(masked)))
            was, model.masked[v] = model.masked[v], masked
            if was and not masked:
                model.release()
        elif kind == "message":
            _, v, address, data = o
            fn.msix.table_write(16 * v, struct.pack("<Q", address))
            fn.msix.table_write(16 * v + 8, struct.pack("<I", data))
            model.messages[v] = (address, data)
        else:
            assert fn.msix.notify(o[1]) == model.notify(o[1]), o
        assert sink.messages == model.sent, (o, model)
        assert fn.pba() == sum(1 << v for v in model.pending), (o, model)
