"""--runas USER and --chroot DIR: Firecracker's jailer model inside kvmpy itself.

kvmpy opens, as the user who started it (root, for /dev/kvm, TAPs and bridges), everything the
machine needs: /dev/kvm, the VM, guest RAM, images, TAPs and vhost-net, the consoles and the QMP
sockets. Then, once, before any vCPU or the I/O loop runs (Machine._open_consoles, the point
after which nothing more is opened): chroot into DIR (kvmpy's Python modules are imported first,
since none can be loaded from inside DIR), then drop to USER's uid, gid and supplementary groups.
What is already open stays usable; nothing new can be opened as root. The unix sockets kvmpy
bound are handed to USER so it can remove them at the end (in a sticky /tmp only the owner can).
"""
from __future__ import annotations

import importlib
import logging
import os
import pkgutil
import pwd
import stat

from kvmpy.errors import ConfigError, KvmpyError
from kvmpy.sandbox.policy import RunAs

log = logging.getLogger(__name__)

# Imported before a chroot, since nothing can be loaded from inside DIR afterwards: every kvmpy
# package a running machine may reach, and the standard modules it loads only when first used.
LATE_PACKAGES = ("kvmpy.machine", "kvmpy.migrate", "kvmpy.monitor", "kvmpy.devices", "kvmpy.vhost",
                 "kvmpy.vcpu", "kvmpy.memslots", "kvmpy.boot")
LATE_MODULES = ("socket", "subprocess", "json", "traceback", "linecache", "tokenize", "selectors",
                "queue", "encodings.idna", "encodings.ascii", "encodings.latin_1", "zlib")


def preload_modules() -> None:
    """Import what kvmpy may need later (a module this build lacks is skipped)."""
    names = list(LATE_MODULES)
    for package in LATE_PACKAGES:
        try:
            module = importlib.import_module(package)
        except ImportError:
            continue
        names += [info.name for info in pkgutil.walk_packages(module.__path__, package + ".")]
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            log.debug("preloading %s: not available", name)


def resolve_runas(text: str) -> RunAs:
    """--runas USER (a name, or UID[:GID] as numbers): its uid, gid and groups; an unknown user is
    refused here, before anything is opened."""
    context = "checking --runas"
    if not text:
        raise ConfigError(context, detail="give a user name (or UID:GID)")
    if text.replace(":", "").isdigit():
        uid_text, _, gid_text = text.partition(":")
        uid = int(uid_text)
        try:
            entry = pwd.getpwuid(uid)
        except KeyError:
            entry = None
        if not gid_text and entry is None:
            raise ConfigError(context, detail=f"uid {uid} has no passwd entry: give UID:GID")
        gid = int(gid_text) if gid_text else entry.pw_gid   # type: ignore[union-attr]
        name = entry.pw_name if entry is not None else str(uid)
        groups = tuple(os.getgrouplist(name, gid)) if entry is not None else (gid,)
    else:
        try:
            entry = pwd.getpwnam(text)
        except KeyError:
            raise ConfigError(context, detail=f"there is no user {text!r} on this host") from None
        uid, gid, name = entry.pw_uid, entry.pw_gid, entry.pw_name
        groups = tuple(os.getgrouplist(name, gid))
    if uid == 0:
        raise ConfigError(context, detail=f"{text!r} is root: --runas is for dropping privileges")
    for value, what in ((uid, "uid"), (gid, "gid")):
        if value >= 0xFFFF_FFFF:
            raise ConfigError(context, detail=f"{what} {value} is out of range")
    return RunAs(user=name, uid=uid, gid=gid, groups=tuple(sorted(set(groups))))


def check_chroot(path: str) -> str:
    """--chroot DIR must be an existing directory (not /): its absolute path."""
    context = "checking --chroot"
    try:
        st = os.stat(path)
    except OSError as e:
        raise ConfigError(context, errno=e.errno, detail=path) from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(context, detail=f"{path} is not a directory")
    real = os.path.realpath(path)
    if real == "/":
        raise ConfigError(context, detail="/ is the root already: give the directory to confine kvmpy to")
    return real


def check_privileged(runas: RunAs | None, chroot: str | None) -> None:
    """Both need root (CAP_SYS_CHROOT, CAP_SETUID/CAP_SETGID): say so before anything opens."""
    if (runas is not None or chroot is not None) and os.geteuid() != 0:
        flag = "--runas" if runas is not None else "--chroot"
        raise ConfigError(f"checking {flag}", detail="kvmpy must start as root to confine itself")


class OutsidePaths:
    """The unix sockets kvmpy bound outside --chroot DIR: their paths mean nothing inside it, so
    they are removed at the end through directory descriptors opened before the chroot (and
    only if they are still the sockets kvmpy bound)."""

    def __init__(self, paths: list[str]):
        self._entries: list[tuple[int, str, int]] = []
        for path in paths:
            try:
                fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError:
                continue
            name = os.path.basename(path)
            try:
                self._entries.append((fd, name, os.stat(name, dir_fd=fd, follow_symlinks=False).st_ino))
            except OSError:
                os.close(fd)

    def remove(self) -> None:
        entries, self._entries = self._entries, []
        for fd, name, inode in entries:
            try:
                if os.stat(name, dir_fd=fd, follow_symlinks=False).st_ino == inode:
                    os.unlink(name, dir_fd=fd)
            except OSError:
                pass      # removed already, or (--runas) not ours to remove
            finally:
                os.close(fd)


def enter_jail(runas: RunAs | None, chroot: str | None, owned_paths: list[str]) -> OutsidePaths | None:
    """chroot, then drop privileges (in that order: chroot needs root). Verifies the drop.
    Returns, under --chroot, what removes the sockets outside DIR at the end."""
    if runas is None and chroot is None:
        return None
    preload_modules()
    outside = OutsidePaths(owned_paths) if chroot is not None else None
    if runas is not None:
        for path in owned_paths:
            try:
                os.chown(path, runas.uid, runas.gid, follow_symlinks=False)
            except OSError as e:
                log.warning("--runas: cannot hand %s to %s (%s): it may stay behind", path, runas.user, e.strerror)
    try:
        if chroot is not None:
            os.chroot(chroot)
            os.chdir("/")
        if runas is not None:
            os.setgroups(list(runas.groups))
            os.setresgid(runas.gid, runas.gid, runas.gid)
            os.setresuid(runas.uid, runas.uid, runas.uid)
    except OSError as e:
        raise KvmpyError("confining kvmpy (--chroot/--runas)", errno=e.errno) from None
    if runas is not None and (os.getresuid() != (runas.uid,) * 3 or os.getresgid() != (runas.gid,) * 3):
        raise KvmpyError("dropping privileges (--runas)", detail="the uid/gid did not change")
    log.info("confined:%s%s", f" chroot {chroot}" if chroot else "",
             f" running as {runas.user} (uid {runas.uid}, gid {runas.gid})" if runas else "")
    return outside

