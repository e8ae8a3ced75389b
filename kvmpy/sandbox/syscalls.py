"""x86-64 system call numbers the sandbox names (asm/unistd_64.h; tier 0 compares them with the
header when it is installed), grouped as QEMU's -sandbox groups them plus kvmpy's own."""
from __future__ import annotations

NR: dict[str, int] = {
    "read": 0, "write": 1, "open": 2, "poll": 7, "ioctl": 16, "pread64": 17, "pwrite64": 18,
    "socket": 41, "connect": 42, "accept": 43, "sendto": 44, "recvfrom": 45, "bind": 49,
    "listen": 50, "socketpair": 53, "clone": 56, "fork": 57, "vfork": 58, "execve": 59,
    "creat": 85, "ptrace": 101, "syslog": 103, "setuid": 105, "setgid": 106, "setreuid": 113,
    "setregid": 114, "setgroups": 116, "setresuid": 117, "setresgid": 119, "setfsuid": 122,
    "setfsgid": 123, "capset": 126, "mknod": 133, "uselib": 134, "ustat": 136, "sysfs": 139,
    "setpriority": 141, "sched_setparam": 142, "sched_setscheduler": 144, "vhangup": 153,
    "pivot_root": 155, "_sysctl": 156, "adjtimex": 159, "chroot": 161, "acct": 163,
    "settimeofday": 164, "mount": 165, "umount2": 166, "swapon": 167, "swapoff": 168,
    "reboot": 169, "sethostname": 170, "setdomainname": 171, "iopl": 172, "ioperm": 173,
    "create_module": 174, "init_module": 175, "delete_module": 176, "get_kernel_syms": 177,
    "query_module": 178, "quotactl": 179, "nfsservctl": 180, "getpmsg": 181, "putpmsg": 182,
    "afs_syscall": 183, "tuxcall": 184, "security": 185, "futex": 202, "sched_setaffinity": 203,
    "lookup_dcookie": 212, "clock_settime": 227, "clock_nanosleep": 230, "epoll_wait": 232,
    "vserver": 236, "mbind": 237, "set_mempolicy": 238, "kexec_load": 246, "add_key": 248,
    "request_key": 249, "keyctl": 250, "migrate_pages": 256, "openat": 257, "mknodat": 259,
    "ppoll": 271, "unshare": 272, "move_pages": 279, "epoll_pwait": 281, "accept4": 288,
    "preadv": 295, "pwritev": 296, "perf_event_open": 298, "fanotify_init": 300,
    "name_to_handle_at": 303, "open_by_handle_at": 304, "clock_adjtime": 305, "setns": 308,
    "process_vm_readv": 310, "process_vm_writev": 311, "kcmp": 312, "finit_module": 313,
    "sched_setattr": 314, "memfd_create": 319, "kexec_file_load": 320, "bpf": 321,
    "execveat": 322, "userfaultfd": 323, "io_uring_setup": 425, "open_tree": 428,
    "move_mount": 429, "fsopen": 430, "fsmount": 432, "fspick": 433, "clone3": 435,
    "openat2": 437, "mount_setattr": 442,
}
NAME: dict[int, str] = {nr: name for name, nr in NR.items()}

# QEMU's -sandbox groups (qemu-seccomp.c), by the same names
OBSOLETE = ("uselib", "ustat", "sysfs", "_sysctl", "create_module", "get_kernel_syms",
            "query_module", "nfsservctl", "getpmsg", "putpmsg", "afs_syscall", "tuxcall",
            "security", "vserver", "lookup_dcookie", "vhangup")
ELEVATE_PRIVILEGES = ("setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid",
                      "setgroups", "setfsuid", "setfsgid", "capset")
SPAWN = ("fork", "vfork", "execve", "execveat")       # and clone without CLONE_THREAD
RESOURCE_CONTROL = ("setpriority", "sched_setparam", "sched_setscheduler", "sched_setaffinity",
                    "sched_setattr", "set_mempolicy", "mbind", "migrate_pages", "move_pages")

# Never needed by a running VMM, whatever the options (QEMU's always-on default set, widened):
# the kernel's own state, other processes, namespaces and mounts, device nodes.
SYSTEM = ("ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "kexec_load",
          "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot", "swapon",
          "swapoff", "mount", "umount2", "pivot_root", "chroot", "unshare", "setns", "bpf",
          "perf_event_open", "keyctl", "add_key", "request_key", "acct", "settimeofday",
          "clock_settime", "clock_adjtime", "adjtimex", "sethostname", "setdomainname", "iopl",
          "ioperm", "quotactl", "syslog", "open_by_handle_at", "name_to_handle_at", "mknod",
          "mknodat", "fanotify_init", "open_tree", "move_mount", "fsopen", "fsmount", "fspick",
          "mount_setattr")

# What threads that only move data between descriptors kvmpy already holds have no use for
OPEN_FILES = ("open", "openat", "openat2", "creat", "memfd_create")
NEW_SOCKETS = ("socket", "socketpair", "bind", "listen", "connect")
ACCEPT = ("accept", "accept4")

# The hottest calls, tested first: a KVM_RUN costs one comparison before its allow
HOT = ("ioctl", "futex", "read", "write", "epoll_wait", "epoll_pwait", "ppoll", "poll",
       "pread64", "pwrite64", "preadv", "pwritev", "recvfrom", "sendto", "clock_nanosleep")
