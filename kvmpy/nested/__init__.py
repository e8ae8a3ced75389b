"""kvmpy.nested: the nested hardware-KVM harness (L1 = Debian 6.1 under QEMU TCG with SVM)
and the guest images tier-2 tests boot. Nothing here is imported by the VMM itself."""
