"""ACPI 6.x tables in the BIOS area, so a guest finds its CPUs, interrupt routing, PCI root
bridge and a power-off/reset path the way it does on a PC.

Written at 0xE0000 (reserved in the e820 map; Linux scans 0xE0000-0xFFFFF for the RSDP on
16-byte boundaries), below the MP table's fallback spot at 0xF0000. Tables: RSDP (rev 2),
RSDT and XSDT, a classic (not hardware-reduced) FADT rev 6 with PM1a event/control, PM timer
and a reset register in I/O space, FACS, a DSDT with `\\_S5` and `\\_SB.PCI0`, and a MADT with
one local APIC per vCPU, the IOAPIC and the ISA interrupt source overrides that match the MP
table. The port numbers come from the composer (it owns the PM device), so they are inputs.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterable

from kvmpy.boot import aml
from kvmpy.boot.layout import BIOS_AREA_START, BootRegion
from kvmpy.boot.mptable import IOAPIC_ADDR, IOAPIC_PINS, LAPIC_ADDR, MAX_CPUS, PciInterrupt
from kvmpy.errors import BootError
from kvmpy.memslots import GuestMemory

ACPI_TABLES_START = 0xE0000
ACPI_TABLES_END = BIOS_AREA_START          # 0xF0000 may hold the MP table for many vCPUs
OEM_ID = b"KVMPY "
OEM_REVISION = 1
CREATOR_ID = b"KVMP"
CREATOR_REVISION = 1
HEADER_FMT = "<4sIBB6s8sI4sI"              # signature .. creator revision, 36 bytes
HEADER_SIZE = struct.calcsize(HEADER_FMT)
CHECKSUM_OFFSET = 9

RSDP_SIGNATURE = b"RSD PTR "
RSDP_FMT = "<8sB6sBIIQB3x"                 # ACPI 2.0+ RSDP, 36 bytes
RSDP_SIZE = struct.calcsize(RSDP_FMT)
RSDP_V1_SIZE = 20
FACS_SIZE = 64
FADT_REVISION, FADT_MINOR_REVISION, FADT_SIZE = 6, 0, 276
MADT_REVISION = 5
DSDT_REVISION = 2                          # 64-bit integers

# FADT fields (ACPI 6.x table 5.9)
GAS_SYSTEM_IO = 1
ACCESS_UNDEFINED, ACCESS_BYTE = 0, 1
FADT_WBINVD = 1 << 0
FADT_PROC_C1 = 1 << 2
FADT_PWR_BUTTON = 1 << 4                   # set: no fixed-feature power button
FADT_SLP_BUTTON = 1 << 5                   # set: no fixed-feature sleep button
FADT_FIX_RTC = 1 << 6                      # set: RTC wake status is not in PM1 (not emulated)
FADT_RESET_REG_SUP = 1 << 10
BOOT_ARCH_LEGACY_DEVICES = 1 << 0
BOOT_ARCH_8042 = 1 << 1                    # keeps Linux probing the i8042 without a PNP node
C2_UNSUPPORTED_LATENCY = 0x0FFF            # > 100 us: no C2
C3_UNSUPPORTED_LATENCY = 0x0FFF            # > 1000 us: no C3
CMOS_CENTURY_REGISTER = 0x32
PM1_EVT_LEN, PM1_CNT_LEN, PM_TMR_LEN = 4, 2, 4
SCI_IRQ = 9

# MADT (ACPI 6.x section 5.2.12)
MADT_PCAT_COMPAT = 1 << 0                  # the 8259 PICs are present too
MADT_LAPIC, MADT_IOAPIC, MADT_ISO, MADT_LAPIC_NMI = 0, 1, 2, 4
LAPIC_ENABLED = 1 << 0
MPS_INTI_CONFORMS = 0x0
MPS_INTI_LEVEL_HIGH = 0x1 | (0x3 << 2)     # polarity active high, trigger level
ALL_PROCESSORS_UID = 0xFF
LINT1 = 1

PCI_HOST_BRIDGE_HID = "PNP0A03"
PCI_CONFIG_PORTS = (0xCF8, 8)


@dataclass(frozen=True)
class AcpiPmPorts:
    """I/O ports of the PM device (the composer registers it there) and the values it acts on:
    SLP_TYP `s5_sleep_type` with SLP_EN powers off, `reset_value` at `reset` resets."""
    pm1a_evt: int
    pm1a_cnt: int
    pm_tmr: int
    reset: int
    reset_value: int
    s5_sleep_type: int

    def validate(self) -> None:
        for what, port, length in (("PM1a_EVT", self.pm1a_evt, PM1_EVT_LEN),
                                   ("PM1a_CNT", self.pm1a_cnt, PM1_CNT_LEN),
                                   ("PM_TMR", self.pm_tmr, PM_TMR_LEN), ("RESET_REG", self.reset, 1)):
            if not 0 < port <= 0x10000 - length:
                raise BootError("building ACPI tables", detail=f"{what} port {port:#x} is not an I/O port")
        if not 0 <= self.reset_value <= 0xFF or not 0 <= self.s5_sleep_type <= 7:
            raise BootError("building ACPI tables",
                            detail=f"reset value {self.reset_value} / SLP_TYP {self.s5_sleep_type}")


@dataclass(frozen=True)
class AcpiPlatform:
    """What the tables describe. `pci_mmio_window` is [start, end) of the BAR allocator;
    `isa_irq0_pin` is the IOAPIC pin of the PIT (0 with KVM's identity routing, or 2)."""
    num_cpus: int
    pm: AcpiPmPorts
    pci_interrupts: tuple[PciInterrupt, ...] = ()
    pci_mmio_window: tuple[int, int] = (0xC000_0000, 0xFEC0_0000)
    isa_irq0_pin: int = 0
    sci_irq: int = SCI_IRQ

    def validate(self) -> None:
        if not 1 <= self.num_cpus <= MAX_CPUS:
            raise BootError("building ACPI tables", detail=f"{self.num_cpus} CPUs: allowed 1..{MAX_CPUS}")
        self.pm.validate()
        lo, hi = self.pci_mmio_window
        if not 0 <= lo < hi <= 1 << 32:
            raise BootError("building ACPI tables", detail=f"PCI window [{lo:#x}, {hi:#x}) is not 32-bit")
        if self.isa_irq0_pin not in (0, 2) or not 0 < self.sci_irq < 16 or self.sci_irq in (0, 2):
            raise BootError("building ACPI tables",
                            detail=f"IRQ0 pin {self.isa_irq0_pin} / SCI IRQ {self.sci_irq}")
        seen: set[tuple[int, int]] = set()
        for p in self.pci_interrupts:
            if not (0 <= p.slot < 32 and 1 <= p.pin <= 4 and 16 <= p.ioapic_pin < IOAPIC_PINS):
                raise BootError("building ACPI tables",
                                detail=f"bad PCI interrupt {p}: slot 0..31, pin 1..4, GSI 16..23")
            if (p.slot, p.pin) in seen:
                raise BootError("building ACPI tables", detail=f"PCI slot {p.slot} pin {p.pin} routed twice")
            seen.add((p.slot, p.pin))


@dataclass(frozen=True)
class AcpiTables:
    """The tables as one blob to be written at `base`; `addresses` maps signature -> GPA."""
    base: int
    blob: bytes
    addresses: dict[str, int]


def checksum(data: bytes) -> int:
    return (-sum(data)) & 0xFF


def sdt(signature: bytes, revision: int, body: bytes, oem_table_id: bytes | None = None) -> bytes:
    """A system description table: the 36-byte header with length and checksum, then `body`."""
    table_id = oem_table_id or (b"KVMPY" + signature[:3])
    header = struct.pack(HEADER_FMT, signature, HEADER_SIZE + len(body), revision, 0, OEM_ID,
                         table_id.ljust(8, b" ")[:8], OEM_REVISION, CREATOR_ID, CREATOR_REVISION)
    table = bytearray(header + body)
    table[CHECKSUM_OFFSET] = checksum(bytes(table))
    return bytes(table)


def gas(address: int, bit_width: int, access_size: int = ACCESS_UNDEFINED) -> bytes:
    """A Generic Address Structure for an I/O-port register."""
    return struct.pack("<BBBBQ", GAS_SYSTEM_IO, bit_width, 0, access_size, address)


def build_rsdp(rsdt: int, xsdt: int) -> bytes:
    rsdp = bytearray(struct.pack(RSDP_FMT, RSDP_SIGNATURE, 0, OEM_ID, 2, rsdt, RSDP_SIZE, xsdt, 0))
    rsdp[8] = checksum(bytes(rsdp[:RSDP_V1_SIZE]))
    rsdp[32] = checksum(bytes(rsdp))
    return bytes(rsdp)


def build_facs() -> bytes:
    """FACS: no checksum, no waking vector (kvmpy offers no S3), global lock unused."""
    return struct.pack("<4sIIIIIQB3xI24x", b"FACS", FACS_SIZE, 0, 0, 0, 0, 0, 2, 0)


def build_fadt(pm: AcpiPmPorts, dsdt: int, facs: int, sci_irq: int = SCI_IRQ) -> bytes:
    """A classic FADT: PM1a_EVT/PM1a_CNT/PM_TMR in I/O space, RESET_REG, no SMI (always in ACPI
    mode), no GPE blocks, C2/C3 off, i8042 and legacy devices present, and the fixed-feature
    power button (PWR_BUTTON clear: PM1 PWRBTN_STS/EN, so QMP system_powerdown reaches the guest;
    no sleep button)."""
    flags = (FADT_WBINVD | FADT_PROC_C1 | FADT_SLP_BUTTON | FADT_FIX_RTC | FADT_RESET_REG_SUP)
    body = bytearray(FADT_SIZE - HEADER_SIZE)

    def put(offset: int, fmt: str, *values: object) -> None:
        struct.pack_into(fmt, body, offset - HEADER_SIZE, *values)

    put(36, "<II", 0, 0)                                    # FIRMWARE_CTRL, DSDT: X_ fields instead
    put(46, "<HI", sci_irq, 0)                              # SCI_INT, SMI_CMD (none)
    put(56, "<IIIIIIII", pm.pm1a_evt, 0, pm.pm1a_cnt, 0, 0, pm.pm_tmr, 0, 0)
    put(88, "<BBBBBBBB", PM1_EVT_LEN, PM1_CNT_LEN, 0, PM_TMR_LEN, 0, 0, 0, 0)
    put(96, "<HH", C2_UNSUPPORTED_LATENCY, C3_UNSUPPORTED_LATENCY)
    put(108, "<BH", CMOS_CENTURY_REGISTER, BOOT_ARCH_LEGACY_DEVICES | BOOT_ARCH_8042)
    put(112, "<I", flags)
    body[116 - HEADER_SIZE:128 - HEADER_SIZE] = gas(pm.reset, 8, ACCESS_BYTE)
    put(128, "<BHB", pm.reset_value, 0, FADT_MINOR_REVISION)
    put(132, "<QQ", facs, dsdt)                             # X_FIRMWARE_CTRL, X_DSDT
    for offset, port, length in ((148, pm.pm1a_evt, PM1_EVT_LEN), (172, pm.pm1a_cnt, PM1_CNT_LEN),
                                 (208, pm.pm_tmr, PM_TMR_LEN)):
        body[offset - HEADER_SIZE:offset - HEADER_SIZE + 12] = gas(port, length * 8)
    return sdt(b"FACP", FADT_REVISION, bytes(body))


def build_madt(num_cpus: int, isa_irq0_pin: int = 0, sci_irq: int = SCI_IRQ) -> bytes:
    """Local APICs 0..N-1 (enabled), IOAPIC id N at 0xFEC00000 with GSI base 0, overrides for
    IRQ0 (as the MP table routes it) and the SCI (level, active high), LINT1 = NMI."""
    body = struct.pack("<II", LAPIC_ADDR, MADT_PCAT_COMPAT)
    body += b"".join(struct.pack("<BBBBI", MADT_LAPIC, 8, cpu, cpu, LAPIC_ENABLED) for cpu in range(num_cpus))
    body += struct.pack("<BBBBII", MADT_IOAPIC, 12, num_cpus, 0, IOAPIC_ADDR, 0)
    body += struct.pack("<BBBBIH", MADT_ISO, 10, 0, 0, isa_irq0_pin, MPS_INTI_CONFORMS)
    body += struct.pack("<BBBBIH", MADT_ISO, 10, 0, sci_irq, sci_irq, MPS_INTI_LEVEL_HIGH)
    body += struct.pack("<BBBHB", MADT_LAPIC_NMI, 6, ALL_PROCESSORS_UID, MPS_INTI_CONFORMS, LINT1)
    return sdt(b"APIC", MADT_REVISION, body)


def pci_root_resources(mmio_window: tuple[int, int]) -> aml.RawAml:
    """_CRS of \\_SB.PCI0: bus 0, the config ports, all other I/O ports, the BAR window."""
    cf8, cf8_len = PCI_CONFIG_PORTS
    return aml.resource_template(
        aml.word_address(aml.ADDRESS_SPACE_BUS, 0, 0),
        aml.io_port(cf8, cf8_len),
        aml.word_address(aml.ADDRESS_SPACE_IO, 0x0000, cf8 - 1, aml.IO_RANGE_ENTIRE),
        aml.word_address(aml.ADDRESS_SPACE_IO, 0x0D00, 0xFFFF, aml.IO_RANGE_ENTIRE),
        aml.dword_address(aml.ADDRESS_SPACE_MEMORY, mmio_window[0], mmio_window[1] - 1, aml.MEM_READ_WRITE))


def pci_routing_table(interrupts: Iterable[PciInterrupt]) -> aml.RawAml:
    """_PRT: one {slot address, pin (0 = INTA), 0, GSI} entry per wired INTx (GSIs hard-wired)."""
    entries = [aml.package([(p.slot << 16) | 0xFFFF, p.pin - 1, 0, p.ioapic_pin])
               for p in sorted(interrupts, key=lambda p: (p.slot, p.pin))]
    return aml.package(entries)


def build_dsdt(platform: AcpiPlatform) -> bytes:
    s5 = platform.pm.s5_sleep_type
    # Names are relative to the definition block's root scope: the shortest form, as iasl emits.
    code = aml.name("_S5", aml.package([s5, s5, 0, 0]))
    code += aml.scope("_SB", aml.device(
        "PCI0",
        aml.name("_HID", aml.eisa_id(PCI_HOST_BRIDGE_HID)),
        aml.name("_ADR", 0),
        aml.name("_UID", 0),
        aml.name("_BBN", 0),
        aml.name("_CRS", pci_root_resources(platform.pci_mmio_window)),
        aml.name("_PRT", pci_routing_table(platform.pci_interrupts))))
    return sdt(b"DSDT", DSDT_REVISION, code)


def build_acpi_tables(platform: AcpiPlatform, base: int = ACPI_TABLES_START) -> AcpiTables:
    """All tables laid out from `base` (16-byte aligned; FACS 64-byte aligned), pointers filled."""
    platform.validate()
    if base % 16:
        raise BootError("building ACPI tables", detail=f"base {base:#x} is not 16-byte aligned")
    facs_at = base + 64                                     # RSDP first, then the 64-aligned FACS
    dsdt = build_dsdt(platform)
    dsdt_at = facs_at + FACS_SIZE
    fadt_at = _align16(dsdt_at + len(dsdt))
    fadt = build_fadt(platform.pm, dsdt_at, facs_at, platform.sci_irq)
    madt_at = _align16(fadt_at + len(fadt))
    madt = build_madt(platform.num_cpus, platform.isa_irq0_pin, platform.sci_irq)
    rsdt_at = _align16(madt_at + len(madt))
    rsdt = sdt(b"RSDT", 1, struct.pack("<II", fadt_at, madt_at))
    xsdt_at = _align16(rsdt_at + len(rsdt))
    xsdt = sdt(b"XSDT", 1, struct.pack("<QQ", fadt_at, madt_at))
    if xsdt_at + len(xsdt) >= 1 << 32:
        raise BootError("building ACPI tables", detail="tables must sit below 4 GiB for the RSDT")
    blob = bytearray(xsdt_at + len(xsdt) - base)
    placed = {"RSD PTR ": (base, build_rsdp(rsdt_at, xsdt_at)), "FACS": (facs_at, build_facs()),
              "DSDT": (dsdt_at, dsdt), "FACP": (fadt_at, fadt), "APIC": (madt_at, madt),
              "RSDT": (rsdt_at, rsdt), "XSDT": (xsdt_at, xsdt)}
    for at, data in placed.values():
        blob[at - base:at - base + len(data)] = data
    return AcpiTables(base, bytes(blob), {sig: at for sig, (at, _) in placed.items()})


def write_acpi_tables(mem: GuestMemory, platform: AcpiPlatform) -> BootRegion:
    """Build the tables and write them at ACPI_TABLES_START, staying below ACPI_TABLES_END."""
    tables = build_acpi_tables(platform)
    end = tables.base + len(tables.blob)
    if end > ACPI_TABLES_END:
        raise BootError("building ACPI tables",
                        detail=f"{len(tables.blob)} bytes run past {ACPI_TABLES_END:#x}")
    if not mem.contains(tables.base, len(tables.blob)):
        raise BootError("building ACPI tables", detail=f"guest RAM does not cover {tables.base:#x}")
    mem.write(tables.base, tables.blob)
    return BootRegion("acpi", tables.base, len(tables.blob))


def _align16(value: int) -> int:
    return (value + 15) & ~15
