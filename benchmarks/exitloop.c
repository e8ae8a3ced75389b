/* C baseline for `kvmpy bench exits`: the same guest, the same KVM_RUN round trips, no Python.
 *
 * Usage: exitloop GUEST.bin COUNT [PORT [DEVICE]]
 * Loads tests/guest/out/pio_loop.bin (a flat real-mode guest) at 0x1000, sets rcx=COUNT and
 * rdx=PORT, and runs until HLT, answering every port-I/O exit with nothing more than reading
 * its data byte. Prints one JSON line with its figures.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define MEM_SIZE (1u << 20)
#define LOAD_ADDR 0x1000u

static void die(const char *what)
{
    fprintf(stderr, "exitloop: %s: %s\n", what, strerror(errno));
    exit(1);
}

static double now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

static double user_us(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec * 1e6 + ru.ru_utime.tv_usec;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s GUEST.bin COUNT [PORT [DEVICE]]\n", argv[0]);
        return 2;
    }
    unsigned long count = strtoul(argv[2], NULL, 0);
    unsigned long port = argc > 3 ? strtoul(argv[3], NULL, 0) : 0x10;
    const char *dev = argc > 4 ? argv[4] : "/dev/kvm";
    if (count == 0 || count > 0xffffffffUL || port > 0xffff) {
        fprintf(stderr, "exitloop: COUNT must be 1..2^32-1 and PORT 0..0xffff\n");
        return 2;
    }
    int kvm = open(dev, O_RDWR | O_CLOEXEC);
    if (kvm < 0)
        die("opening the KVM device");
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0)
        die("KVM_CREATE_VM");
    uint8_t *mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED)
        die("mmap guest memory");
    int gfd = open(argv[1], O_RDONLY);
    if (gfd < 0)
        die("opening the guest binary");
    ssize_t n = read(gfd, mem + LOAD_ADDR, MEM_SIZE - LOAD_ADDR);
    if (n <= 0)
        die("reading the guest binary");
    close(gfd);
    struct kvm_userspace_memory_region region = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = MEM_SIZE, .userspace_addr = (uint64_t)mem,
    };
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
        die("KVM_SET_USER_MEMORY_REGION");
    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0)
        die("KVM_CREATE_VCPU");
    int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED)
        die("mmap kvm_run");
    struct kvm_sregs sregs;
    if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0)
        die("KVM_GET_SREGS");
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0)
        die("KVM_SET_SREGS");
    struct kvm_regs regs = { .rip = LOAD_ADDR, .rflags = 2, .rcx = count, .rdx = port, .rsp = 0x8000 };
    if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0)
        die("KVM_SET_REGS");

    unsigned long exits = 0, io_exits = 0;
    volatile uint64_t sink = 0;
    double t0 = now_us(), u0 = user_us();
    for (;;) {
        if (ioctl(vcpu, KVM_RUN, 0) < 0) {
            if (errno == EINTR)
                continue;
            die("KVM_RUN");
        }
        exits++;
        if (run->exit_reason == KVM_EXIT_IO) {
            io_exits++;
            sink += *((uint8_t *)run + run->io.data_offset);
            continue;
        }
        if (run->exit_reason == KVM_EXIT_HLT)
            break;
        fprintf(stderr, "exitloop: unexpected exit reason %u\n", run->exit_reason);
        return 1;
    }
    double t1 = now_us(), u1 = user_us();
    printf("{\"impl\": \"c\", \"exits\": %lu, \"io_exits\": %lu, \"us_per_exit\": %.3f, "
           "\"user_us_per_exit\": %.3f, \"wall_s\": %.4f}\n",
           exits, io_exits, (t1 - t0) / exits, (u1 - u0) / exits, (t1 - t0) / 1e6);
    return 0;
}
