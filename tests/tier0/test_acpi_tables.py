"""ACPI tables: found the way Linux scans for them, checksums, lengths/revisions, FADT and MADT
fields at their ACPI 6.x offsets, the DSDT decoded by an independent AML reader in this file,
and (when acpica-tools is installed) iasl's disassembler and compiler agreeing with the bytes."""
from __future__ import annotations

import shutil
import struct
import subprocess

import pytest

from kvmpy.boot import aml
from kvmpy.boot.acpi import (ACPI_TABLES_END, ACPI_TABLES_START, AcpiPlatform, AcpiPmPorts,
                             build_acpi_tables, write_acpi_tables)
from kvmpy.boot.mptable import PciInterrupt, write_mptable
from kvmpy.devices.acpi_pm import (PM1_CNT_OFFSET, PM1_STS_OFFSET, PM_BASE_PORT, PM_TMR_OFFSET, RESET_OFFSET,
                                   RESET_VALUE, S5_SLEEP_TYPE)
from kvmpy.devices.pci.host import BAR_WINDOW_END, BAR_WINDOW_START
from kvmpy.errors import BootError
from kvmpy.memslots import GuestMemory

PM = AcpiPmPorts(pm1a_evt=PM_BASE_PORT + PM1_STS_OFFSET, pm1a_cnt=PM_BASE_PORT + PM1_CNT_OFFSET,
                 pm_tmr=PM_BASE_PORT + PM_TMR_OFFSET, reset=PM_BASE_PORT + RESET_OFFSET,
                 reset_value=RESET_VALUE, s5_sleep_type=S5_SLEEP_TYPE)
ROUTES = (PciInterrupt(slot=1, pin=1, ioapic_pin=16), PciInterrupt(slot=2, pin=1, ioapic_pin=17),
          PciInterrupt(slot=3, pin=1, ioapic_pin=18))
PNP0A03 = 0x030AD041          # EISAID("PNP0A03") as every firmware encodes it


def platform(cpus: int = 2, routes=ROUTES) -> AcpiPlatform:
    return AcpiPlatform(num_cpus=cpus, pm=PM, pci_interrupts=tuple(routes),
                        pci_mmio_window=(BAR_WINDOW_START, BAR_WINDOW_END))


@pytest.fixture
def mem():
    m = GuestMemory.create(4 << 20)
    yield m
    m.close()


# -- reading back like an OS -------------------------------------------------------------------
def find_rsdp(mem: GuestMemory) -> int:
    """Linux/ACPICA's scan: 16-byte steps over 0xE0000-0xFFFFF, signature + v1 checksum."""
    for at in range(0xE0000, 0x100000, 16):
        head = mem.read(at, 20)
        if head[:8] == b"RSD PTR " and sum(head) % 256 == 0:
            return at
    raise AssertionError("no RSDP in 0xE0000-0xFFFFF")


def read_table(mem: GuestMemory, gpa: int, signature: bytes, revision: int) -> bytes:
    length = struct.unpack("<I", mem.read(gpa + 4, 4))[0]
    table = mem.read(gpa, length)
    assert table[:4] == signature and table[8] == revision, (table[:4], table[8])
    assert sum(table) % 256 == 0, f"{signature!r} checksum"
    assert table[10:16] == b"KVMPY " and table[28:32] == b"KVMP"
    return table


def walk(mem: GuestMemory) -> dict[bytes, bytes]:
    rsdp_at = find_rsdp(mem)
    rsdp = mem.read(rsdp_at, 36)
    sig, _, oem, rev, rsdt_at, length, xsdt_at, _ = struct.unpack("<8sB6sBIIQB3x", rsdp)
    assert rev == 2 and length == 36 and sum(rsdp) % 256 == 0 and oem == b"KVMPY "
    xsdt = read_table(mem, xsdt_at, b"XSDT", 1)
    rsdt = read_table(mem, rsdt_at, b"RSDT", 1)
    x_ptrs = struct.unpack(f"<{(len(xsdt) - 36) // 8}Q", xsdt[36:])
    r_ptrs = struct.unpack(f"<{(len(rsdt) - 36) // 4}I", rsdt[36:])
    assert list(x_ptrs) == list(r_ptrs) and len(x_ptrs) == 2
    tables = {b"FACP": read_table(mem, x_ptrs[0], b"FACP", 6), b"APIC": read_table(mem, x_ptrs[1], b"APIC", 5)}
    fadt = tables[b"FACP"]
    assert len(fadt) == 276
    x_facs, x_dsdt = struct.unpack_from("<QQ", fadt, 132)
    assert struct.unpack_from("<II", fadt, 36) == (0, 0), "32-bit pointers must be 0 when X_ ones are set"
    tables[b"DSDT"] = read_table(mem, x_dsdt, b"DSDT", 2)
    facs = mem.read(x_facs, 64)
    assert x_facs % 64 == 0 and facs[:4] == b"FACS" and struct.unpack_from("<I", facs, 4)[0] == 64
    assert facs[32] == 2
    return tables


def gas(table: bytes, offset: int) -> tuple[int, int, int, int, int]:
    return struct.unpack_from("<BBBBQ", table, offset)


@pytest.mark.parametrize("cpus", [1, 2, 4, 64])
def test_tables_coexist_with_the_mp_table_and_checksum(mem, cpus):
    mp = write_mptable(mem, cpus, ROUTES, isa_irq0_pin=0)
    region = write_acpi_tables(mem, platform(cpus))
    assert region.gpa == ACPI_TABLES_START and region.end <= ACPI_TABLES_END
    assert mp.end <= region.gpa or mp.gpa >= region.end
    assert mem.read(mp.gpa, 4) == b"_MP_"
    tables = walk(mem)
    madt = tables[b"APIC"]
    assert struct.unpack_from("<II", madt, 36) == (0xFEE00000, 1)
    entries, pos = [], 44
    while pos < len(madt):
        kind, length = madt[pos], madt[pos + 1]
        assert length >= 2 and pos + length <= len(madt)
        entries.append((kind, madt[pos:pos + length]))
        pos += length
    assert pos == len(madt)
    lapics = [struct.unpack("<BBBBI", e) for k, e in entries if k == 0]
    assert [(uid, apic, flags) for _, _, uid, apic, flags in lapics] == [(i, i, 1) for i in range(cpus)]
    (ioapic,) = [struct.unpack("<BBBBII", e) for k, e in entries if k == 1]
    assert ioapic[2:] == (cpus, 0, 0xFEC00000, 0)
    isos = {struct.unpack("<BBBBIH", e)[3]: struct.unpack("<BBBBIH", e)[4:] for k, e in entries if k == 2}
    assert isos == {0: (0, 0x0), 9: (9, 0xD)}, "IRQ0 identity like the MP table; SCI level/high"
    (nmi,) = [struct.unpack("<BBBHB", e) for k, e in entries if k == 4]
    assert nmi[2:] == (0xFF, 0, 1)


def test_fadt_fields_at_acpi6_offsets(mem):
    write_acpi_tables(mem, platform())
    fadt = walk(mem)[b"FACP"]
    assert struct.unpack_from("<H", fadt, 46)[0] == 9                      # SCI_INT
    assert struct.unpack_from("<I", fadt, 48)[0] == 0                      # SMI_CMD: none
    assert struct.unpack_from("<IIII", fadt, 56)[0::2] == (0x600, 0x604)   # PM1a_EVT, PM1a_CNT
    assert struct.unpack_from("<I", fadt, 76)[0] == 0x608                  # PM_TMR_BLK
    assert tuple(fadt[88:92]) == (4, 2, 0, 4)                              # PM1_EVT/CNT, PM2, TMR lengths
    assert tuple(fadt[92:94]) == (0, 0)                                    # no GPE blocks
    boot_arch = struct.unpack_from("<H", fadt, 109)[0]
    assert boot_arch & 0b11 == 0b11 and not boot_arch & (1 << 3), "legacy+8042 set, MSI not disabled"
    flags = struct.unpack_from("<I", fadt, 112)[0]
    assert flags & (1 << 10) and not flags & (1 << 20), "RESET_REG_SUP, not HW_REDUCED_ACPI"
    assert not flags & (1 << 4), "PWR_BUTTON clear: the fixed power button exists (system_powerdown)"
    assert gas(fadt, 116) == (1, 8, 0, 1, 0x60C) and fadt[128] == RESET_VALUE
    assert fadt[131] == 0                                                  # FADT minor version
    assert gas(fadt, 148) == (1, 32, 0, 0, 0x600)                          # X_PM1a_EVT_BLK
    assert gas(fadt, 172) == (1, 16, 0, 0, 0x604)                          # X_PM1a_CNT_BLK
    assert gas(fadt, 208) == (1, 32, 0, 0, 0x608)                          # X_PM_TMR_BLK
    assert fadt[160:172] == bytes(12) and fadt[184:208] == bytes(24)       # PM1b, PM2: absent


# -- an independent AML reader (only what a constant-only DSDT may contain) --------------------
class AmlReader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def byte(self) -> int:
        b = self.data[self.pos]
        self.pos += 1
        return b

    def pkg_end(self) -> int:
        start = self.pos
        lead = self.byte()
        count = lead >> 6
        if count == 0:
            return start + (lead & 0x3F)
        assert not lead & 0x30, "bits 4-5 must be 0 in a multi-byte PkgLength"
        value = lead & 0x0F
        for i in range(count):
            value |= self.byte() << (4 + 8 * i)
        return start + value

    def name(self) -> str:
        prefix = ""
        while self.data[self.pos] in b"\\^":
            prefix += chr(self.byte())
        b = self.data[self.pos]
        if b == 0:
            self.pos += 1
            return prefix
        count = 1
        if b == 0x2E:
            self.pos, count = self.pos + 1, 2
        elif b == 0x2F:
            self.pos += 1
            count = self.byte()
        segs = []
        for _ in range(count):
            seg = self.data[self.pos:self.pos + 4].decode("ascii")
            assert seg[0] in "_ABCDEFGHIJKLMNOPQRSTUVWXYZ", seg
            segs.append(seg)
            self.pos += 4
        return prefix + ".".join(segs)

    def data_object(self):
        op = self.byte()
        if op in (0x00, 0x01):
            return op
        if op == 0xFF:
            return (1 << 64) - 1
        sizes = {0x0A: 1, 0x0B: 2, 0x0C: 4, 0x0E: 8}
        if op in sizes:
            v = int.from_bytes(self.data[self.pos:self.pos + sizes[op]], "little")
            self.pos += sizes[op]
            return v
        if op == 0x0D:
            end = self.data.index(b"\x00", self.pos)
            s = self.data[self.pos:end].decode("ascii")
            self.pos = end + 1
            return s
        if op == 0x12:
            end = self.pkg_end()
            n = self.byte()
            items = []
            while self.pos < end:
                items.append(self.data_object())
            assert self.pos == end and len(items) == n
            return items
        if op == 0x11:
            end = self.pkg_end()
            size = self.data_object()
            buf = self.data[self.pos:end]
            assert len(buf) == size
            self.pos = end
            return bytes(buf)
        raise AssertionError(f"unexpected data opcode {op:#x} at {self.pos - 1}")

    def terms(self, end: int, scope: str, out: dict) -> None:
        while self.pos < end:
            op = self.byte()
            if op == 0x08:
                path = self.name()
                out[qualify(scope, path)] = self.data_object()
            elif op == 0x10:
                body_end = self.pkg_end()
                self.terms(body_end, qualify(scope, self.name()), out)
            elif op == 0x5B and self.data[self.pos] == 0x82:
                self.pos += 1
                body_end = self.pkg_end()
                path = qualify(scope, self.name())
                out[path] = "Device"
                self.terms(body_end, path, out)
            else:
                raise AssertionError(f"unexpected term opcode {op:#x} at {self.pos - 1}")
        assert self.pos == end


def qualify(scope: str, path: str) -> str:
    if path.startswith("\\"):
        return path
    return (scope.rstrip(".") + "." if scope != "\\" else "\\") + path


def decode_resources(buf: bytes) -> list[tuple]:
    out, pos = [], 0
    while True:
        tag = buf[pos]
        if tag == 0x79:
            assert pos + 2 == len(buf), "end tag must be last"
            return out
        if tag == 0x47:
            out.append(("io",) + struct.unpack_from("<BHHBB", buf, pos + 1))
            pos += 8
        elif tag in (0x87, 0x88):
            length = struct.unpack_from("<H", buf, pos + 1)[0]
            fmt = "<BBB5I" if tag == 0x87 else "<BBB5H"
            assert length == struct.calcsize(fmt)
            out.append(("dword" if tag == 0x87 else "word",) + struct.unpack_from(fmt, buf, pos + 3))
            pos += 3 + length
        else:
            raise AssertionError(f"unexpected resource tag {tag:#x}")


def decoded_dsdt(routes=ROUTES) -> dict:
    tables = build_acpi_tables(platform(routes=routes))
    at = tables.addresses["DSDT"] - tables.base
    length = struct.unpack_from("<I", tables.blob, at + 4)[0]
    reader = AmlReader(tables.blob[at:at + length])
    reader.pos = 36
    out: dict = {}
    reader.terms(length, "\\", out)
    return out


def test_dsdt_decodes_to_s5_and_the_pci_root_bridge():
    ns = decoded_dsdt()
    assert ns["\\_S5_"] == [S5_SLEEP_TYPE, S5_SLEEP_TYPE, 0, 0]
    assert ns["\\_SB_.PCI0"] == "Device"
    assert ns["\\_SB_.PCI0._HID"] == PNP0A03
    assert ns["\\_SB_.PCI0._BBN"] == 0 and ns["\\_SB_.PCI0._UID"] == 0
    crs = decode_resources(ns["\\_SB_.PCI0._CRS"])
    assert crs == [
        ("word", 2, 0x0C, 0, 0, 0, 0, 0, 1),                               # bus 0..0
        ("io", 1, 0xCF8, 0xCF8, 1, 8),
        ("word", 1, 0x0C, 3, 0, 0x0000, 0x0CF7, 0, 0x0CF8),
        ("word", 1, 0x0C, 3, 0, 0x0D00, 0xFFFF, 0, 0xF300),
        ("dword", 0, 0x0C, 1, 0, BAR_WINDOW_START, BAR_WINDOW_END - 1, 0, BAR_WINDOW_END - BAR_WINDOW_START)]
    assert ns["\\_SB_.PCI0._PRT"] == [[(r.slot << 16) | 0xFFFF, r.pin - 1, 0, r.ioapic_pin] for r in ROUTES]


def test_dsdt_without_pci_devices_has_an_empty_prt():
    assert decoded_dsdt(routes=())["\\_SB_.PCI0._PRT"] == []


# -- the encoder's corner cases ----------------------------------------------------------------
@pytest.mark.parametrize("body,encoded", [
    (0, b"\x01"), (62, b"\x3f"), (63, b"\x41\x04"), (4093, b"\x4f\xff"), (4094, b"\x81\x00\x01"),
    (0xFFFFC, b"\x8f\xff\xff"), (0xFFFFD, b"\xc1\x00\x00\x01")])
def test_pkg_length_boundaries(body, encoded):
    assert aml.pkg_length(body) == encoded
    reader = AmlReader(encoded)
    assert reader.pkg_end() == body + len(encoded)


@pytest.mark.parametrize("value,encoded", [
    (0, b"\x00"), (1, b"\x01"), (2, b"\x0a\x02"), (0xFF, b"\x0a\xff"), (0x100, b"\x0b\x00\x01"),
    (0x10000, b"\x0c\x00\x00\x01\x00"), (1 << 32, b"\x0e" + (1 << 32).to_bytes(8, "little"))])
def test_integer_encoding(value, encoded):
    assert aml.integer(value) == encoded


@pytest.mark.parametrize("path,encoded", [
    ("_S5", b"_S5_"), ("\\_SB.PCI0", b"\\\x2e_SB_PCI0"), ("^A.B.C", b"^\x2f\x03A___B___C___"), ("\\", b"\\\x00")])
def test_name_strings(path, encoded):
    assert aml.name_string(path) == encoded


@pytest.mark.parametrize("call", [
    lambda: aml.integer(-1), lambda: aml.integer(1 << 64), lambda: aml.name_seg("1ABC"),
    lambda: aml.name_seg("ABCDE"), lambda: aml.name_seg("ab"), lambda: aml.eisa_id("PNP0A0"),
    lambda: aml.eisa_id("PNP0AXZ"), lambda: aml.string("a\x00b"), lambda: aml.package([0] * 256),
    lambda: aml.io_port(0xFFFF, 2), lambda: aml.word_address(1, 5, 4), lambda: aml.data_object(True),
    lambda: aml.pkg_length(1 << 28)])
def test_encoder_refuses_bad_input(call):
    with pytest.raises(BootError):
        call()


@pytest.mark.parametrize("bad", [
    dict(num_cpus=0), dict(num_cpus=255), dict(pci_interrupts=(PciInterrupt(1, 1, 9),)),
    dict(pci_interrupts=(PciInterrupt(1, 1, 16), PciInterrupt(1, 1, 17))),
    dict(pci_interrupts=(PciInterrupt(32, 1, 16),)), dict(pci_mmio_window=(0xC000_0000, 1 << 33)),
    dict(isa_irq0_pin=1), dict(sci_irq=2),
    dict(pm=AcpiPmPorts(0, 0x604, 0x608, 0x60C, 6, 5)), dict(pm=AcpiPmPorts(0x600, 0x604, 0x608, 0x60C, 6, 8))])
def test_platform_validation(bad):
    args = dict(num_cpus=1, pm=PM) | bad
    with pytest.raises(BootError):
        build_acpi_tables(AcpiPlatform(**args))


def test_write_refuses_memory_without_the_bios_area():
    class NoLowRam:
        def contains(self, gpa, size):
            return False
    with pytest.raises(BootError):
        write_acpi_tables(NoLowRam(), platform())  # type: ignore[arg-type]


# -- iasl, when acpica-tools is installed (make deps installs it) ------------------------------
IASL = shutil.which("iasl")


@pytest.mark.skipif(IASL is None, reason="iasl not installed (Debian package acpica-tools; `make deps`)")
@pytest.mark.parametrize("signature", ["DSDT", "FACP", "APIC"])
def test_iasl_disassembles_without_complaint(tmp_path, signature):
    tables = build_acpi_tables(platform(cpus=4))
    at = tables.addresses[signature] - tables.base
    length = struct.unpack_from("<I", tables.blob, at + 4)[0]
    (tmp_path / "t.dat").write_bytes(tables.blob[at:at + length])
    r = subprocess.run([IASL, "-d", "t.dat"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    text = r.stdout + r.stderr
    assert r.returncode == 0, text
    assert "Error" not in text and "Warning" not in text, text
    dsl = (tmp_path / "t.dsl").read_text()
    assert "**** Invalid" not in dsl and "Unknown" not in dsl, dsl
    if signature == "DSDT":
        # Recompile the disassembly: iasl must produce the very same AML (header aside).
        r = subprocess.run([IASL, "-p", "re", "t.dsl"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        assert (tmp_path / "re.aml").read_bytes()[36:] == tables.blob[at + 36:at + length]
