"""The unix-socket console backend: a listening socket, one client at a time (a second one is
told "busy"); output is dropped while nobody is connected. Kept apart from kvmpy.devices.console
so that only machines with a unix: console import the socket module."""
from __future__ import annotations

import os
import stat

from kvmpy.devices.console import Console, _limited, check_socket_path
from kvmpy.errors import ConfigError


class UnixSocketConsole(Console):
    """A listening unix socket; one client at a time gets the guest's output and feeds input."""

    def __init__(self, path: str, lazy: bool = False, **kw: float):
        super().__init__(**kw)
        self.path = path
        check_socket_path(path)
        self._listener = None
        self._client = None
        self._opened = False
        if not lazy:
            self.open()

    def _open_backend(self) -> None:
        path = self.path
        _claim_socket_path(path)
        import socket  # here, not at module level: only unix-socket consoles pay for it
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            listener.bind(path)
            listener.listen(1)
        except OSError as e:
            listener.close()
            raise ConfigError(f"listening on console socket {path!r}", errno=e.errno) from None
        self._listener = listener

    def _has_input(self) -> bool:
        return True

    @property
    def connected(self) -> bool:
        return self._client is not None

    def _read_loop(self) -> None:
        while not self._closing:
            client = self._client
            fds = [self._listener.fileno()] + ([client.fileno()] if client else [])
            ready = self._wait_readable(fds)
            if not ready:
                return
            if self._listener.fileno() in ready:
                self._accept()
            if client is not None and client.fileno() in ready:
                try:
                    data = client.recv(4096)
                except OSError:
                    data = b""
                if data:
                    self._deliver(data)
                else:
                    self._client = None
                    client.close()

    def _accept(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except OSError as e:
            _limited.warning(("console", "accept"), "console accept failed: %s", e)
            return
        if self._client is not None:
            try:
                conn.sendall(b"kvmpy console busy: another client is attached\r\n")
            except OSError:
                pass
            conn.close()
            return
        conn.settimeout(1.0)   # a client that stops reading is dropped, not waited on
        self._client = conn

    def _write_out(self, data: bytes) -> None:
        client = self._client
        if client is None:
            return
        try:
            client.sendall(data)
        except OSError:
            # The reader thread owns closing; shutting down makes its recv() return b"".
            try:
                import socket  # loaded already: a client exists
                client.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _release(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        self._listener.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


def _claim_socket_path(path: str) -> None:
    """Remove a stale socket left by a dead kvmpy; refuse a live one or a non-socket."""
    import socket
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"creating console socket {path!r}", detail="exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)
    else:
        raise ConfigError(f"creating console socket {path!r}",
                          detail="another process is listening on it")
    finally:
        probe.close()
