"""PCI bus 0: host bridge, config mechanism #1, BARs, capability lists, MSI-X."""
from kvmpy.devices.pci.config import Bar, BarRegion, PciFunction, PciFunctionState
from kvmpy.devices.pci.host import BarAllocator, IntxRoute, PciHostBridge, PciRoot, PciRootState
from kvmpy.devices.pci.msix import MsixCapability, MsixState, MsixVector

__all__ = ["Bar", "BarRegion", "PciFunction", "PciFunctionState", "BarAllocator", "IntxRoute",
           "PciHostBridge", "PciRoot", "PciRootState", "MsixCapability", "MsixState", "MsixVector"]
