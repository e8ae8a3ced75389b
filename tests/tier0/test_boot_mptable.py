"""MP table (Intel MP spec 1.4): checksums, entry counts and contents for N = 1, 2, 4."""
import struct

import pytest

from kvmpy.boot import PciInterrupt, build_mptable, write_mptable
from kvmpy.boot.layout import BIOS_AREA_START, EBDA_START
from kvmpy.errors import BootError
from kvmpy.memslots import GuestMemory

ENTRY_SIZES = {0: 20, 1: 8, 2: 8, 3: 8, 4: 8}


@pytest.fixture(scope="module")
def mem():
    m = GuestMemory.create(2 << 20)
    yield m
    m.close()


def parse(mem, base):
    """Read back the tables the way an OS does; returns (floating pointer, header, entries)."""
    fp = mem.read(base, 16)
    assert fp[:4] == b"_MP_" and sum(fp) % 256 == 0
    physptr, length, rev = struct.unpack_from("<IBB", fp, 4)
    assert (length, rev, fp[11]) == (1, 4, 0)                       # 16 bytes, spec 1.4, config table present
    hdr = mem.read(physptr, 44)
    sig, table_len, rev, _, oem, product, _, _, count, lapic, ext_len, _, _ = struct.unpack("<4sHBB8s12sIHHIHBB", hdr)
    assert sig == b"PCMP" and rev == 4 and lapic == 0xFEE00000 and ext_len == 0
    table = mem.read(physptr, table_len)
    assert sum(table) % 256 == 0
    entries, pos = [], 44
    for _ in range(count):
        kind = table[pos]
        entries.append(table[pos:pos + ENTRY_SIZES[kind]])
        pos += ENTRY_SIZES[kind]
    assert pos == table_len
    return entries


@pytest.mark.parametrize("ncpus", [1, 2, 4])
def test_tables_for_n_cpus(mem, ncpus):
    region = write_mptable(mem, ncpus)
    assert region.gpa == EBDA_START and region.end <= 0xA0000
    entries = parse(mem, EBDA_START)
    by_type = {t: [e for e in entries if e[0] == t] for t in range(5)}
    assert len(entries) == ncpus + 2 + 1 + 15 + 2
    cpus = [struct.unpack("<BBBBII8x", e) for e in by_type[0]]
    assert [c[1] for c in cpus] == list(range(ncpus))               # APIC ids 0..N-1
    assert [c[3] for c in cpus] == [3] + [1] * (ncpus - 1)          # enabled, BSP only on CPU 0
    assert all(c[5] & (1 << 9) for c in cpus)                       # APIC feature flag
    assert sorted(e[2:8] for e in by_type[1]) == [b"ISA   ", b"PCI   "]
    (ioapic,) = [struct.unpack("<BBBBI", e) for e in by_type[2]]
    assert ioapic == (2, ncpus, 0x11, 1, 0xFEC00000)                # IOAPIC id N
    ints = {struct.unpack("<BBHBBBB", e)[4]: struct.unpack("<BBHBBBB", e) for e in by_type[3]}
    assert sorted(ints) == [0, 1] + list(range(3, 16))              # ISA IRQs, cascade IRQ2 omitted
    assert ints[0][6] == 2 and all(ints[i][6] == i for i in ints if i)   # IRQ0 -> pin 2, others identity
    assert all(i[5] == ncpus and i[3] == 1 for i in ints.values())  # to the IOAPIC, from the ISA bus
    lints = [struct.unpack("<BBHBBBB", e) for e in by_type[4]]
    assert [(li[1], li[5], li[6]) for li in lints] == [(3, 0xFF, 0), (1, 0xFF, 1)]   # ExtINT LINT0, NMI LINT1


def test_pci_interrupt_entries(mem):
    write_mptable(mem, 2, [PciInterrupt(slot=1, pin=1, ioapic_pin=16), PciInterrupt(slot=3, pin=2, ioapic_pin=19)])
    entries = [struct.unpack("<BBHBBBB", e) for e in parse(mem, EBDA_START) if e[0] == 3]
    pci = [e for e in entries if e[3] == 0]                         # source bus 0 = PCI
    assert [(e[4], e[6], e[2]) for e in pci] == [((1 << 2) | 0, 16, 0xF), ((3 << 2) | 1, 19, 0xF)]


def test_cpu_signature_from_cpuid(mem):
    write_mptable(mem, 2, cpu_signature=0x906EA, cpu_features=0x0F8BFBFF)
    cpus = [struct.unpack("<BBBBII8x", e) for e in parse(mem, EBDA_START) if e[0] == 0]
    assert [(c[4], c[5]) for c in cpus] == [(0x906EA, 0x0F8BFBFF)] * 2


def test_identity_irq0_option(mem):
    write_mptable(mem, 1, isa_irq0_pin=0)
    ints = [struct.unpack("<BBHBBBB", e) for e in parse(mem, EBDA_START) if e[0] == 3]
    assert [(i[4], i[6]) for i in ints] == [(n, n) for n in range(16)]


def test_many_cpus_move_to_bios_area(mem):
    region = write_mptable(mem, 64)
    assert region.gpa == BIOS_AREA_START
    assert len([e for e in parse(mem, BIOS_AREA_START) if e[0] == 0]) == 64


@pytest.mark.parametrize("args, reason", [
    ((0,), "1..254"), ((255,), "1..254"),
    ((2, [PciInterrupt(32, 1, 16)]), "bad PCI interrupt"), ((2, [PciInterrupt(1, 5, 16)]), "bad PCI interrupt"),
    ((2, [PciInterrupt(1, 1, 24)]), "bad PCI interrupt"), ((2, [PciInterrupt(1, 1, 9)]), "taken by ISA"),
    ((2, [PciInterrupt(1, 1, 16), PciInterrupt(1, 1, 17)]), "routed twice"),
])
def test_bad_arguments(args, reason):
    with pytest.raises(BootError, match=reason):
        build_mptable(EBDA_START, *args)
