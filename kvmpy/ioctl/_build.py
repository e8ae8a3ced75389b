"""CFFI (API mode) build of kvmpy.ioctl._kvm: KVM and vhost structs checked against the system
headers by the C compiler, plus a tiny errno-returning ioctl wrapper.

API mode so every struct layout and constant comes from <linux/kvm.h>, never from hand-copied
offsets. Build in place for development with `python kvmpy/ioctl/_build.py`; `pip install -e .`
builds it through setup.py's cffi_modules.
"""
from __future__ import annotations

import os

from cffi import FFI

CDEF = r"""
typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef int __s32;
typedef unsigned long long __u64;

/* ---- constants (values from the headers at build time) ---- */
#define KVMIO ...
#define KVM_API_VERSION ...
#define KVMPY_KVM_RUN ...
#define KVM_EXIT_UNKNOWN ...
#define KVM_EXIT_EXCEPTION ...
#define KVM_EXIT_IO ...
#define KVM_EXIT_HYPERCALL ...
#define KVM_EXIT_DEBUG ...
#define KVM_EXIT_HLT ...
#define KVM_EXIT_MMIO ...
#define KVM_EXIT_IRQ_WINDOW_OPEN ...
#define KVM_EXIT_SHUTDOWN ...
#define KVM_EXIT_FAIL_ENTRY ...
#define KVM_EXIT_INTR ...
#define KVM_EXIT_INTERNAL_ERROR ...
#define KVM_EXIT_SYSTEM_EVENT ...
#define KVM_EXIT_DIRTY_RING_FULL ...
#define KVM_EXIT_X86_RDMSR ...
#define KVM_EXIT_X86_WRMSR ...
#define KVM_EXIT_IO_IN ...
#define KVM_EXIT_IO_OUT ...
#define KVM_SYSTEM_EVENT_SHUTDOWN ...
#define KVM_SYSTEM_EVENT_RESET ...
#define KVM_SYSTEM_EVENT_CRASH ...
#define KVM_INTERNAL_ERROR_EMULATION ...
#define KVM_MEM_LOG_DIRTY_PAGES ...
#define KVM_MEM_READONLY ...
#define KVM_IRQFD_FLAG_DEASSIGN ...
#define KVM_IRQFD_FLAG_RESAMPLE ...
#define KVM_IOEVENTFD_FLAG_DATAMATCH ...
#define KVM_IOEVENTFD_FLAG_PIO ...
#define KVM_IOEVENTFD_FLAG_DEASSIGN ...
#define KVM_IRQ_ROUTING_IRQCHIP ...
#define KVM_IRQ_ROUTING_MSI ...
#define KVM_MSI_VALID_DEVID ...
#define KVM_PIT_SPEAKER_DUMMY ...
#define KVM_IRQCHIP_PIC_MASTER ...
#define KVM_IRQCHIP_PIC_SLAVE ...
#define KVM_IRQCHIP_IOAPIC ...
#define KVM_DIRTY_LOG_PAGE_OFFSET ...
#define KVM_DIRTY_GFN_F_DIRTY ...
#define KVM_DIRTY_GFN_F_RESET ...
#define KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE ...
#define KVM_DIRTY_LOG_INITIALLY_SET ...
#define KVM_MP_STATE_RUNNABLE ...
#define KVM_MP_STATE_HALTED ...
#define KVMPY_NR_INTERRUPT_WORDS ...
#define KVM_CAP_IRQCHIP ...
#define KVM_CAP_HLT ...
#define KVM_CAP_USER_MEMORY ...
#define KVM_CAP_SET_TSS_ADDR ...
#define KVM_CAP_EXT_CPUID ...
#define KVM_CAP_NR_VCPUS ...
#define KVM_CAP_MAX_VCPUS ...
#define KVM_CAP_NR_MEMSLOTS ...
#define KVM_CAP_PIT2 ...
#define KVM_CAP_PIT_STATE2 ...
#define KVM_CAP_IOEVENTFD ...
#define KVM_CAP_IRQFD ...
#define KVM_CAP_IRQFD_RESAMPLE ...
#define KVM_CAP_IRQ_ROUTING ...
#define KVM_CAP_SIGNAL_MSI ...
#define KVM_CAP_SET_IDENTITY_MAP_ADDR ...
#define KVM_CAP_ADJUST_CLOCK ...
#define KVM_CAP_VCPU_EVENTS ...
#define KVM_CAP_DEBUGREGS ...
#define KVM_CAP_XSAVE ...
#define KVM_CAP_XSAVE2 ...
#define KVM_CAP_XCRS ...
#define KVM_CAP_TSC_CONTROL ...
#define KVM_CAP_GET_TSC_KHZ ...
#define KVM_CAP_IMMEDIATE_EXIT ...
#define KVM_CAP_SYNC_MMU ...
#define KVM_CAP_MP_STATE ...
#define KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 ...
#define KVM_CAP_DIRTY_LOG_RING ...
#define KVM_CAP_DIRTY_LOG_RING_ACQ_REL ...
#define KVM_CAP_TSC_DEADLINE_TIMER ...
#define KVM_CAP_COALESCED_MMIO ...
#define KVM_CAP_COALESCED_PIO ...
#define KVM_COALESCED_MMIO_PAGE_OFFSET ...
#define KVM_CAP_SPLIT_IRQCHIP ...
#define KVM_CAP_X2APIC_API ...
#define KVM_CAP_IOEVENTFD_ANY_LENGTH ...
#define KVM_CAP_READONLY_MEM ...
#define KVM_CAP_INTERNAL_ERROR_DATA ...
#define KVM_CAP_SYSTEM_EVENT_DATA ...
#define KVM_CAP_KVMCLOCK_CTRL ...
#define KVM_CAP_NESTED_STATE ...
#define KVM_CAP_ADJUST_CLOCK ...
#define KVM_CLOCK_TSC_STABLE ...

/* ---- VM-level structs ---- */
struct kvm_userspace_memory_region {
    __u32 slot; __u32 flags; __u64 guest_phys_addr; __u64 memory_size;
    __u64 userspace_addr;
};
struct kvm_irq_level { __u32 irq; __u32 level; ...; };
struct kvm_irqfd { __u32 fd; __u32 gsi; __u32 flags; __u32 resamplefd; ...; };
struct kvm_coalesced_mmio_zone { __u64 addr; __u32 size; __u32 pio; ...; };
struct kvm_coalesced_mmio { __u64 phys_addr; __u32 len; __u32 pio; __u8 data[8]; };
struct kvm_coalesced_mmio_ring { __u32 first; __u32 last; ...; };
struct kvm_ioeventfd {
    __u64 datamatch; __u64 addr; __u32 len; __s32 fd; __u32 flags; ...;
};
struct kvm_irq_routing_irqchip { __u32 irqchip; __u32 pin; };
struct kvm_irq_routing_msi {
    __u32 address_lo; __u32 address_hi; __u32 data; union { __u32 pad; __u32 devid; };
};
struct kvm_irq_routing_s390_adapter {
    __u64 ind_addr; __u64 summary_addr; __u64 ind_offset; __u32 summary_offset; __u32 adapter_id;
};
struct kvm_irq_routing_entry {
    __u32 gsi; __u32 type; __u32 flags; __u32 pad;
    union { struct kvm_irq_routing_irqchip irqchip; struct kvm_irq_routing_msi msi;
            struct kvm_irq_routing_s390_adapter adapter;
            __u32 pad[8]; } u;
};
struct kvm_irq_routing { __u32 nr; __u32 flags; struct kvm_irq_routing_entry entries[]; };
struct kvm_msi {
    __u32 address_lo; __u32 address_hi; __u32 data; __u32 flags; __u32 devid; ...;
};
struct kvm_dirty_log { __u32 slot; void *dirty_bitmap; ...; };
struct kvm_clear_dirty_log {
    __u32 slot; __u32 num_pages; __u64 first_page; void *dirty_bitmap; ...;
};
struct kvm_enable_cap { __u32 cap; __u32 flags; __u64 args[4]; ...; };
struct kvm_dirty_gfn { __u32 flags; __u32 slot; __u64 offset; };
struct kvm_pic_state {
    __u8 last_irr; __u8 irr; __u8 imr; __u8 isr; __u8 priority_add;
    __u8 irq_base; __u8 read_reg_select; __u8 poll; __u8 special_mask;
    __u8 init_state; __u8 auto_eoi; __u8 rotate_on_auto_eoi;
    __u8 special_fully_nested_mode; __u8 init4; __u8 elcr; __u8 elcr_mask;
};
struct kvm_ioapic_state {
    __u64 base_address; __u32 ioregsel; __u32 id; __u32 irr; __u32 pad;
    union { __u64 bits; } redirtbl[24];
};
struct kvm_irqchip {
    __u32 chip_id; __u32 pad;
    union { char dummy[512]; struct kvm_pic_state pic; struct kvm_ioapic_state ioapic; } chip;
};
struct kvm_pit_config { __u32 flags; ...; };
struct kvm_pit_state2 { __u32 flags; ...; };
struct kvm_clock_data { __u64 clock; __u32 flags; __u64 realtime; __u64 host_tsc; ...; };

/* ---- vCPU-level structs ---- */
struct kvm_regs {
    __u64 rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp;
    __u64 r8, r9, r10, r11, r12, r13, r14, r15;
    __u64 rip, rflags;
};
struct kvm_segment {
    __u64 base; __u32 limit; __u16 selector; __u8 type;
    __u8 present, dpl, db, s, l, g, avl; __u8 unusable; __u8 padding;
};
struct kvm_dtable { __u64 base; __u16 limit; __u16 padding[3]; };
struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss; struct kvm_segment tr, ldt;
    struct kvm_dtable gdt, idt;
    __u64 cr0, cr2, cr3, cr4, cr8; __u64 efer; __u64 apic_base;
    __u64 interrupt_bitmap[...];
};
struct kvm_fpu {
    __u8 fpr[8][16]; __u16 fcw; __u16 fsw; __u8 ftwx; __u8 pad1;
    __u16 last_opcode; __u64 last_ip; __u64 last_dp; __u8 xmm[16][16];
    __u32 mxcsr; __u32 pad2;
};
struct kvm_xsave { __u32 region[1024]; __u32 extra[]; };
/* KVM_GET/SET_NESTED_STATE: a 128-byte header, then format-specific data up to `size` */
struct kvm_nested_state { __u16 flags; __u16 format; __u32 size; ...; };
struct kvm_xcr { __u32 xcr; __u32 reserved; __u64 value; };
struct kvm_xcrs { __u32 nr_xcrs; __u32 flags; struct kvm_xcr xcrs[...]; ...; };
struct kvm_msr_entry { __u32 index; __u32 reserved; __u64 data; };
struct kvm_msrs { __u32 nmsrs; __u32 pad; struct kvm_msr_entry entries[]; };
struct kvm_msr_list { __u32 nmsrs; __u32 indices[]; };
struct kvm_lapic_state { char regs[...]; };
struct kvm_mp_state { __u32 mp_state; };
struct kvm_translation {
    __u64 linear_address; __u64 physical_address;
    __u8 valid; __u8 writeable; __u8 usermode; ...;
};
struct kvm_vcpu_events {
    struct { __u8 injected; __u8 nr; __u8 has_error_code; __u8 pending;
             __u32 error_code; } exception;
    struct { __u8 injected; __u8 nr; __u8 soft; __u8 shadow; } interrupt;
    struct { __u8 injected; __u8 pending; __u8 masked; __u8 pad; } nmi;
    __u32 sipi_vector; __u32 flags;
    struct { __u8 smm; __u8 pending; __u8 smm_inside_nmi; __u8 latched_init; } smi;
    struct { __u8 pending; } triple_fault;
    __u8 reserved[26]; __u8 exception_has_payload; __u64 exception_payload;
};
struct kvm_debugregs { __u64 db[4]; __u64 dr6; __u64 dr7; __u64 flags; ...; };
struct kvm_cpuid_entry2 {
    __u32 function; __u32 index; __u32 flags; __u32 eax; __u32 ebx; __u32 ecx;
    __u32 edx; ...;
};
struct kvm_cpuid2 { __u32 nent; __u32 padding; struct kvm_cpuid_entry2 entries[]; };

struct kvm_run {
    __u8 request_interrupt_window; __u8 immediate_exit;
    __u32 exit_reason; __u8 ready_for_interrupt_injection; __u8 if_flag; __u16 flags;
    __u64 cr8; __u64 apic_base;
    union {
        struct { __u64 hardware_exit_reason; } hw;
        struct { __u64 hardware_entry_failure_reason; __u32 cpu; } fail_entry;
        struct { __u32 exception; __u32 error_code; } ex;
        struct { __u8 direction; __u8 size; __u16 port; __u32 count;
                 __u64 data_offset; } io;
        struct { __u64 phys_addr; __u8 data[8]; __u32 len; __u8 is_write; } mmio;
        struct { __u32 suberror; __u32 ndata; __u64 data[16]; } internal;
        struct { __u32 type; __u32 ndata; __u64 data[16]; } system_event;
        char padding[256];
    };
    __u64 kvm_valid_regs; __u64 kvm_dirty_regs;
    union { char padding[2048]; } s;
};

/* ---- vhost (for the vhost-net offload) ---- */
#define VHOST_VIRTIO ...
struct vhost_vring_state { unsigned int index; unsigned int num; };
struct vhost_vring_file { unsigned int index; int fd; };
struct vhost_vring_addr {
    unsigned int index; unsigned int flags; __u64 desc_user_addr; __u64 used_user_addr;
    __u64 avail_user_addr; __u64 log_guest_addr;
};
struct vhost_memory_region {
    __u64 guest_phys_addr; __u64 memory_size; __u64 userspace_addr; __u64 flags_padding;
};
struct vhost_memory { __u32 nregions; __u32 padding; struct vhost_memory_region regions[]; };

/* ---- helpers ---- */
int kvmpy_ioctl(int fd, unsigned long request, void *arg);
int kvmpy_ioctl_arg(int fd, unsigned long request, unsigned long arg);
int kvmpy_run(int fd);
void kvmpy_mb(void);

/* The exit fast path (see SOURCE): PCI configuration mechanism #1 probes of absent functions
   are answered in C without returning to Python. */
struct kvmpy_fastpio {
    uint32_t pci_addr;          /* the 0xCF8 latch, shared with the Python PciRoot */
    uint32_t pci_present[8];    /* bus 0: bit devfn set when a function exists there */
    uint64_t fast_exits;        /* exits handled here */
    void *ring;                 /* the VM's coalesced-I/O ring when 0xCF8 writes go there, or NULL */
    uint32_t ring_max;          /* its entry count */
    uint32_t lock;              /* serialises draining between vCPU threads */
    uint64_t coalesced;         /* 0xCF8 writes taken from the ring instead of an exit */
};
int kvmpy_run_fast(int fd, struct kvm_run *run, size_t run_size, struct kvmpy_fastpio *f);
void kvmpy_fastpio_drain(struct kvmpy_fastpio *f);
"""

SOURCE = r"""
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <linux/kvm.h>
#include <linux/vhost.h>

#define KVMPY_KVM_RUN KVM_RUN
#define KVMPY_NR_INTERRUPT_WORDS ((KVM_NR_INTERRUPTS + 63) / 64)

/* ioctl returning -errno on failure so Python never has to race on a thread's errno. */
static int kvmpy_ioctl(int fd, unsigned long request, void *arg)
{
    int r = ioctl(fd, request, arg);
    return r < 0 ? -errno : r;
}

static int kvmpy_ioctl_arg(int fd, unsigned long request, unsigned long arg)
{
    int r = ioctl(fd, request, arg);
    return r < 0 ? -errno : r;
}

/* KVM_RUN in a loop that answers, in C, the exits a guest makes by the tens of thousands while
   probing PCI (Linux's early AGP/GART scans read every bus/slot/function): the 0xCF8 address
   latch and config reads/writes of functions that do not exist. Everything else returns to
   Python with the exit in kvm_run, exactly as kvmpy_run would leave it. */
struct kvmpy_fastpio {
    uint32_t pci_addr;
    uint32_t pci_present[8];
    uint64_t fast_exits;
    void *ring;
    uint32_t ring_max;
    uint32_t lock;
    uint64_t coalesced;
};

/* With KVM_CAP_COALESCED_PIO the VMM registers [0xCF8, 0xCFC) as a coalesced zone: the guest's
   writes of the address latch then do not exit at all; KVM appends them to a ring shared with
   userspace, and every later exit drains it here first, so the latch is current before anything
   reads it. That halves the exits of a config-space access (Linux's boot-time AGP/GART scans make
   ~16k of them). Sub-dword writes in the zone are dropped, as PciRoot drops them; entries are
   applied in ring order under a lock because the ring belongs to the VM, not to one vCPU. */
static void kvmpy_fastpio_drain(struct kvmpy_fastpio *f)
{
    struct kvm_coalesced_mmio_ring *ring = f->ring;
    if (!ring || __atomic_load_n(&ring->first, __ATOMIC_RELAXED)
                 == __atomic_load_n(&ring->last, __ATOMIC_ACQUIRE))
        return;
    while (__atomic_exchange_n(&f->lock, 1, __ATOMIC_ACQUIRE))
        ;   /* another vCPU thread is draining: a few entries at most */
    uint32_t first = ring->first;
    uint32_t last = __atomic_load_n(&ring->last, __ATOMIC_ACQUIRE);
    while (first != last && first < f->ring_max && last < f->ring_max) {
        struct kvm_coalesced_mmio *e = &ring->coalesced_mmio[first];
        if (e->pio && e->phys_addr == 0xCF8 && e->len == 4) {
            uint32_t v;
            memcpy(&v, e->data, 4);
            f->pci_addr = v & 0x80FFFFFCu;
            f->coalesced++;
        }
        first = (first + 1) % f->ring_max;
    }
    __atomic_store_n(&ring->first, first, __ATOMIC_RELEASE);
    __atomic_store_n(&f->lock, 0, __ATOMIC_RELEASE);
}

static int kvmpy_run_fast(int fd, struct kvm_run *run, size_t run_size, struct kvmpy_fastpio *f)
{
    for (;;) {
        int r = ioctl(fd, KVM_RUN, 0);
        int err = errno;
        kvmpy_fastpio_drain(f);
        if (r < 0)
            return -err;
        if (run->exit_reason != KVM_EXIT_IO || run->io.count != 1)
            return r;
        uint16_t port = run->io.port;
        uint8_t size = run->io.size;
        uint64_t off = run->io.data_offset;
        if (port < 0xCF8 || port > 0xCFF || off > run_size || size > run_size - off)
            return r;
        uint8_t *data = (uint8_t *)run + off;
        if (port == 0xCF8) {
            if (size != 4)
                return r;
            if (run->io.direction == KVM_EXIT_IO_OUT) {
                uint32_t v;
                memcpy(&v, data, 4);
                f->pci_addr = v & 0x80FFFFFCu;
            } else {
                memcpy(data, &f->pci_addr, 4);
            }
            f->fast_exits++;
            continue;
        }
        if (port < 0xCFC)
            return r;
        uint32_t a = f->pci_addr;
        unsigned devfn = (a >> 8) & 0xFF;
        int present = (a & 0x80000000u) && ((a >> 16) & 0xFF) == 0
                      && (f->pci_present[devfn >> 5] >> (devfn & 31)) & 1;
        if (present)
            return r;
        if (run->io.direction != KVM_EXIT_IO_OUT)
            memset(data, 0xFF, size);
        f->fast_exits++;
    }
}

/* The exit path's one call: KVM_RUN with the GIL released (cffi releases it for us). */
static int kvmpy_run(int fd)
{
    int r = ioctl(fd, KVM_RUN, 0);
    return r < 0 ? -errno : r;
}

/* A full memory barrier, for Python code that stores to a ring shared with the guest and then
   loads what the guest stored (x86 lets that load pass the store: virtio's EVENT_IDX needs the
   order, or a notification or interrupt is lost). */
static void kvmpy_mb(void)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}
"""


# ---- the virtio-blk data path in C (vqfast.c; see kvmpy/devices/virtio/fastpath.py) ----
_HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(_HERE, "vqfast.h")) as _f:
    _VQFAST_H = _f.read()
CDEF += "struct iovec { void *iov_base; size_t iov_len; ...; };\n" + _VQFAST_H + r"""
int kvmpy_vq_pop(struct kvmpy_vq *q, struct kvmpy_chain *c);
int kvmpy_blk_run(struct kvmpy_vq *q, struct kvmpy_blk *b, struct kvmpy_chain *c);
uint64_t kvmpy_dirty_take(uint8_t *map, uint8_t *out, uint64_t n);
"""
with open(os.path.join(_HERE, "vqfast.c")) as _f:
    # vqfast.c's #include "vqfast.h" would need an include path in every build: inline it.
    SOURCE += "\n" + _f.read().replace('#include "vqfast.h"', _VQFAST_H)

# ---- the virtio-net data path in C (netfast.c, after vqfast.c: it reuses kvmpy_vq_pop/push;
# see kvmpy/devices/virtio/netpath.py) ----
with open(os.path.join(_HERE, "netfast.h")) as _f:
    _NETFAST_H = _f.read()
CDEF += _NETFAST_H + r"""
int kvmpy_net_rx(struct kvmpy_vq *q, struct kvmpy_net *n, struct kvmpy_chain *c);
int kvmpy_net_tx(struct kvmpy_vq *q, struct kvmpy_net *n, struct kvmpy_chain *c);
"""
with open(os.path.join(_HERE, "netfast.c")) as _f:
    SOURCE += "\n" + _f.read().replace('#include "netfast.h"', _NETFAST_H)

# ---- live migration's page copies (pagecopy.c; see kvmpy/migrate/pages.py) ----
CDEF += r"""
uint64_t kvmpy_pages_gather(const uint8_t *base, const int64_t *pages, uint64_t n, uint8_t *out, uint8_t *zero);
uint64_t kvmpy_pages_hash(uint64_t h, const uint8_t *data, uint64_t npages);
uint64_t kvmpy_pages_pack(const uint8_t *base, const uint8_t *mask, uint64_t n, uint64_t first, uint64_t max_pages,
                          uint32_t zero_flag, uint8_t *out, uint32_t *table, uint64_t *result, uint64_t *hash);
int kvmpy_pages_place(uint8_t *base, uint64_t npages, const int64_t *table, uint64_t nrows,
                      const uint8_t *data, uint64_t ndata);
"""
with open(os.path.join(_HERE, "pagecopy.c")) as _f:
    SOURCE += "\n" + _f.read()

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("kvmpy.ioctl._kvm", SOURCE, extra_compile_args=["-O2"])

if __name__ == "__main__":
    # In-place development build: compile into kvmpy/ioctl/ next to this file.
    here = os.path.dirname(os.path.abspath(__file__))
    ffibuilder.compile(tmpdir=os.path.dirname(os.path.dirname(here)), verbose=False)
