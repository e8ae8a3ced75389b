"""Intel MultiProcessor Specification 1.4 tables, so a guest without ACPI finds its CPUs, the
IOAPIC and how ISA/PCI interrupts reach it.

Layout: PCI is bus 0 (MP bus ids of PCI buses must equal their PCI bus numbers), ISA is bus 1.
ISA IRQ0 (the PIT) goes to IOAPIC pin 2 as on real chipsets and in QEMU/SeaBIOS, so there is no
entry for IRQ2 (the cascade); the composer must route GSI 0 to pin 2 to match, or pass
isa_irq0_pin=0 to keep KVM's default identity routing (what Firecracker does).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterable

from kvmpy.errors import BootError
from kvmpy.boot.layout import BIOS_AREA_START, EBDA_START, BootRegion
from kvmpy.memslots import GuestMemory

MPF_SIGNATURE = b"_MP_"
MPC_SIGNATURE = b"PCMP"
SPEC_REV = 4
LAPIC_ADDR = 0xFEE00000
IOAPIC_ADDR = 0xFEC00000
LAPIC_VERSION = 0x14
IOAPIC_VERSION = 0x11
IOAPIC_PINS = 24
MAX_CPUS = 254                   # APIC ids 0..N-1 plus the IOAPIC's id N must stay below 0xFF
PCI_BUS_ID = 0
ISA_BUS_ID = 1
CPU_ENABLED = 1 << 0
CPU_BOOTPROCESSOR = 1 << 1
DEFAULT_CPU_SIGNATURE = 0x600    # family 6 (stepping/model 0): what Firecracker advertises
DEFAULT_CPU_FEATURES = (1 << 0) | (1 << 9)   # CPUID.1:EDX FPU | APIC
INT_TYPE_INT, INT_TYPE_NMI, INT_TYPE_EXTINT = 0, 1, 3
IRQ_FLAGS_CONFORMS = 0x0         # polarity/trigger as the bus defines (ISA: edge, active high)
IRQ_FLAGS_LEVEL_LOW = 0xF        # active low (3), level triggered (3 << 2): PCI INTx
ALL_LAPICS = 0xFF

FLOATING_FMT = "<4sIBBB5s"       # signature, physptr, length (16-byte units), spec_rev, checksum, features
CONFIG_FMT = "<4sHBB8s12sIHHIHBB"
CPU_FMT = "<BBBBII8x"
BUS_FMT = "<BB6s"
IOAPIC_FMT = "<BBBBI"
INTSRC_FMT = "<BBHBBBB"
FLOATING_SIZE = struct.calcsize(FLOATING_FMT)
EBDA_BYTES = 0x400                # the EBDA: the last KiB below 640 KiB
BIOS_AREA_BYTES = 0x10000


@dataclass(frozen=True)
class PciInterrupt:
    """PCI INTx routing for the device in `slot` (device number 0..31) on bus 0: `pin` 1..4 is
    INTA#..INTD# (the Interrupt Pin config register's encoding), delivered to IOAPIC input
    `ioapic_pin`."""
    slot: int
    pin: int
    ioapic_pin: int


def _checksum(data: bytes) -> int:
    return (-sum(data)) & 0xFF


def _with_checksum(data: bytes, offset: int) -> bytes:
    buf = bytearray(data)
    buf[offset] = _checksum(bytes(buf))
    return bytes(buf)


def isa_irq_routes(isa_irq0_pin: int) -> list[tuple[int, int]]:
    """(ISA IRQ, IOAPIC pin) pairs for IRQs 0..15."""
    if isa_irq0_pin not in (0, 2):
        raise BootError("building the MP table", detail=f"ISA IRQ0 can go to pin 0 or 2, not {isa_irq0_pin}")
    if isa_irq0_pin == 0:
        return [(irq, irq) for irq in range(16)]
    return [(0, 2)] + [(irq, irq) for irq in range(1, 16) if irq != 2]


def _config_entries(num_cpus: int, pci_interrupts: Iterable[PciInterrupt], isa_irq0_pin: int,
                    cpu_signature: int, cpu_features: int) -> list[bytes]:
    ioapic_id = num_cpus
    entries = [struct.pack(CPU_FMT, 0, cpu, LAPIC_VERSION,
                           CPU_ENABLED | (CPU_BOOTPROCESSOR if cpu == 0 else 0), cpu_signature, cpu_features)
               for cpu in range(num_cpus)]
    entries.append(struct.pack(BUS_FMT, 1, PCI_BUS_ID, b"PCI   "))
    entries.append(struct.pack(BUS_FMT, 1, ISA_BUS_ID, b"ISA   "))
    entries.append(struct.pack(IOAPIC_FMT, 2, ioapic_id, IOAPIC_VERSION, 1, IOAPIC_ADDR))
    used_pins: set[int] = set()
    for irq, pin in isa_irq_routes(isa_irq0_pin):
        used_pins.add(pin)
        entries.append(struct.pack(INTSRC_FMT, 3, INT_TYPE_INT, IRQ_FLAGS_CONFORMS, ISA_BUS_ID, irq, ioapic_id, pin))
    seen: set[tuple[int, int]] = set()
    for p in pci_interrupts:
        if not (0 <= p.slot < 32 and 1 <= p.pin <= 4 and 0 <= p.ioapic_pin < IOAPIC_PINS):
            raise BootError("building the MP table",
                            detail=f"bad PCI interrupt {p}: slot 0..31, pin 1..4, IOAPIC pin 0..23")
        if p.ioapic_pin < 16:
            raise BootError("building the MP table",
                            detail=f"IOAPIC pin {p.ioapic_pin} is taken by ISA IRQs; use 16..23 for PCI")
        if (p.slot, p.pin) in seen:
            raise BootError("building the MP table", detail=f"PCI slot {p.slot} pin {p.pin} routed twice")
        seen.add((p.slot, p.pin))
        entries.append(struct.pack(INTSRC_FMT, 3, INT_TYPE_INT, IRQ_FLAGS_LEVEL_LOW, PCI_BUS_ID,
                                   (p.slot << 2) | (p.pin - 1), ioapic_id, p.ioapic_pin))
    entries.append(struct.pack(INTSRC_FMT, 4, INT_TYPE_EXTINT, IRQ_FLAGS_CONFORMS, ISA_BUS_ID, 0, ALL_LAPICS, 0))
    entries.append(struct.pack(INTSRC_FMT, 4, INT_TYPE_NMI, IRQ_FLAGS_CONFORMS, ISA_BUS_ID, 0, ALL_LAPICS, 1))
    return entries


def build_mptable(base: int, num_cpus: int, pci_interrupts: Iterable[PciInterrupt] = (), *,
                  isa_irq0_pin: int = 2, cpu_signature: int = DEFAULT_CPU_SIGNATURE,
                  cpu_features: int = DEFAULT_CPU_FEATURES) -> bytes:
    """The floating pointer at `base` followed by the configuration table, checksums filled."""
    if not 1 <= num_cpus <= MAX_CPUS:
        raise BootError("building the MP table", detail=f"{num_cpus} CPUs: the MP table allows 1..{MAX_CPUS}")
    entries = _config_entries(num_cpus, pci_interrupts, isa_irq0_pin, cpu_signature, cpu_features)
    body = b"".join(entries)
    length = struct.calcsize(CONFIG_FMT) + len(body)
    header = struct.pack(CONFIG_FMT, MPC_SIGNATURE, length, SPEC_REV, 0, b"KVMPY   ", b"KVMPY-VM    ",
                         0, 0, len(entries), LAPIC_ADDR, 0, 0, 0)
    config = _with_checksum(header + body, 7)
    floating = _with_checksum(struct.pack(FLOATING_FMT, MPF_SIGNATURE, base + FLOATING_SIZE, 1, SPEC_REV,
                                          0, bytes(5)), 10)
    return floating + config


def write_mptable(mem: GuestMemory, num_cpus: int, pci_interrupts: Iterable[PciInterrupt] = (), *,
                  isa_irq0_pin: int = 2, cpu_signature: int = DEFAULT_CPU_SIGNATURE,
                  cpu_features: int = DEFAULT_CPU_FEATURES) -> BootRegion:
    """Write the MP tables into the EBDA (0x9fc00) or, when too big for its 1 KiB, into the BIOS
    area at 0xF0000 (both are scanned by OSes and reserved in the e820 map). `cpu_signature`
    and `cpu_features` are CPUID.1 EAX and EDX, as the spec's processor entries carry them."""
    pci = list(pci_interrupts)
    extra = dict(isa_irq0_pin=isa_irq0_pin, cpu_signature=cpu_signature & 0xFFFFFFFF,
                 cpu_features=cpu_features & 0xFFFFFFFF)
    table = build_mptable(EBDA_START, num_cpus, pci, **extra)
    base = EBDA_START
    if len(table) > EBDA_BYTES:
        base = BIOS_AREA_START
        table = build_mptable(base, num_cpus, pci, **extra)
        if len(table) > BIOS_AREA_BYTES:
            raise BootError("building the MP table", detail=f"{len(table)} bytes do not fit the BIOS area")
    if not mem.contains(base, len(table)):
        raise BootError("building the MP table", detail=f"guest RAM does not cover {base:#x}")
    mem.write(base, table)
    return BootRegion("mptable", base, len(table))
