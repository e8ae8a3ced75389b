"""Listening sockets for `--qmp`: binding without destroying anything that is not ours, and
removing only our own socket file on close."""
from __future__ import annotations

import errno
import os
import socket
import stat

from kvmpy.errors import ConfigError
from kvmpy.monitor.spec import QmpSpec


def bind_unix(path: str) -> tuple[socket.socket, tuple[int, int]]:
    """Bind and listen on `path`; returns the socket and the file's (dev, inode) so close can
    tell its own file from one that replaced it.

    A stale socket (nothing listens) is replaced, as QEMU does; a live one (a second --qmp on
    the same path, another kvmpy) is refused, and so is a path that is not a socket at all
    (replacing it would destroy user data)."""
    what = f"QMP socket unix:{path}"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError(what, detail="the path exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(path)
        except OSError:
            os.unlink(path)          # nothing listens: a leftover from a process that died
        else:
            raise ConfigError(what, errno.EADDRINUSE, "another monitor is listening there")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(128)
        sock.setblocking(False)
        st = os.lstat(path)
    except OSError as e:
        sock.close()
        raise ConfigError(what, e.errno) from None
    return sock, (st.st_dev, st.st_ino)


def bind_tcp(spec: QmpSpec) -> socket.socket:
    """Bind and listen on spec.host:spec.port ("" host: every interface; port 0: any)."""
    what = f"QMP socket {spec.describe()}"
    try:
        infos = socket.getaddrinfo(spec.host or None, spec.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigError(what, detail=f"address resolution failed: {e.strerror}") from None
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(128)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise ConfigError(what, e.errno) from None
    return sock


def remove_unix_socket(path: str, identity: tuple[int, int]) -> None:
    """Remove `path` only if it is still the socket we bound (not one a later process made)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if (st.st_dev, st.st_ino) == identity:
        os.unlink(path)
