"""Where a snapshot / migration stream goes and comes from, in QEMU's spelling: `file:PATH`,
`exec:COMMAND` (run by `sh -c`: `exec:cat > vm.snap`, `exec:zstdcat vm.zst`), and, for live
migration (kvmpy.migrate.live opens those sockets), `tcp:HOST:PORT` and `unix:PATH`.

Saving must never cost the user their previous snapshot or leave half a file: `file:` writes a
temporary file next to PATH (mode 0600: it holds guest RAM), fsyncs it and renames it over PATH
only once everything is written; any failure (a full disk included) removes the temporary file and
leaves PATH as it was. An `exec:` command's failure, or its death while we still write (EPIPE),
is reported as the command and its exit status. Restoring never blocks on a FIFO: `file:` opens
with O_NONBLOCK and insists on a regular file.
"""
from __future__ import annotations

import errno as errno_codes
import fcntl
import logging
import os
import signal
import stat
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO, Iterator

from kvmpy.errors import ConfigError, KvmpyError, MigrationError

log = logging.getLogger(__name__)

ACCEPTED = "file:PATH, exec:COMMAND, tcp:HOST:PORT or unix:PATH"
COMMAND_GRACE_S = 5.0       # how long a command may linger once the stream failed or ended


@dataclass(frozen=True)
class MigrationUri:
    """A parsed URI: `path` for file:/unix:, `command` for exec:, `host`/`port` for tcp: (an
    empty host means every address, as QEMU's `tcp::4444`)."""
    scheme: str
    path: str = ""
    command: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.scheme == "exec":
            return f"exec:{self.command}"
        if self.scheme == "tcp":
            host = f"[{self.host}]" if ":" in self.host else self.host
            return f"tcp:{host}:{self.port}"
        return f"{self.scheme}:{self.path}"


def parse_uri(text: str) -> MigrationUri:
    """Parse a migration URI; anything else is one ConfigError line naming the accepted forms."""
    scheme, colon, rest = text.partition(":")
    bad = ConfigError(f"bad migration URI {text!r}", detail=f"expected {ACCEPTED}")
    if not colon:
        raise bad
    if scheme in ("file", "unix"):
        if not rest or "\0" in rest:
            raise bad
        return MigrationUri(scheme, path=rest)
    if scheme == "exec":
        if not rest.strip() or "\0" in rest:
            raise bad
        return MigrationUri(scheme, command=rest)
    if scheme == "tcp":
        if rest.startswith("["):
            host, bracket, port_text = rest[1:].partition("]")
            if not bracket or not port_text.startswith(":"):
                raise bad
            port_text = port_text[1:]
        else:
            host, _, port_text = rest.rpartition(":")
            if ":" in host:
                raise bad
        if not port_text.isascii() or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise bad
        return MigrationUri(scheme, host=host, port=int(port_text))
    raise bad


def _as_uri(uri: str | MigrationUri) -> MigrationUri:
    parsed = parse_uri(uri) if isinstance(uri, str) else uri
    if parsed.scheme not in ("file", "exec"):
        raise ConfigError(f"migration URI {parsed}",
                          detail=f"{parsed.scheme}: is a live-migration URI (kvmpy.migrate.live), not a "
                                 "file or a command to stream through: use file:PATH or exec:COMMAND here")
    return parsed


def _describe(status: int | None) -> str:
    if status is None:
        return f"was still running {COMMAND_GRACE_S:g} s after the stream failed and was killed"
    if status < 0:
        try:
            return f"was killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"was killed by signal {-status}"
    return f"exited with status {status}"


def _finish_command(proc: subprocess.Popen, grace_s: float | None) -> int | None:
    """Wait for the command (at most `grace_s`) and return its exit status, or None when it was
    still running and was killed."""
    try:
        return proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


def _is_broken_pipe(exc: BaseException) -> bool:
    while exc is not None:
        if isinstance(exc, BrokenPipeError) or getattr(exc, "errno", None) == errno_codes.EPIPE:
            return True
        exc = exc.__cause__  # type: ignore[assignment]
    return False


def _start(command: str, context: str, **streams: object) -> subprocess.Popen:
    try:
        return subprocess.Popen(["sh", "-c", command], **streams)  # type: ignore[call-overload]
    except OSError as exc:
        raise MigrationError(context, errno=exc.errno, detail="cannot run sh") from None


@contextmanager
def open_save_target(uri: str | MigrationUri) -> Iterator[BinaryIO]:
    """A binary file object to write a stream to. file: gives a seekable regular (temporary)
    file, renamed onto PATH when the block ends without an exception; exec: gives the command's
    stdin pipe and checks the command's exit status at the end."""
    parsed = _as_uri(uri)
    if parsed.scheme == "file":
        with _save_file(parsed) as fileobj:
            yield fileobj
    else:
        with _save_exec(parsed) as fileobj:
            yield fileobj


@contextmanager
def _save_file(uri: MigrationUri) -> Iterator[BinaryIO]:
    context = f"saving to {uri}"
    path = os.path.realpath(uri.path)       # write through a symlink, as opening PATH would
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISDIR(mode):
            raise MigrationError(context, detail="it is a directory")
        if not stat.S_ISREG(mode):
            raise MigrationError(context, detail="it exists and is not a regular file")
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise MigrationError(context, errno=exc.errno) from None
    directory, name = os.path.split(path)
    try:
        fd, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".partial", dir=directory)
    except OSError as exc:
        raise MigrationError(context, errno=exc.errno, detail=f"cannot create a file in {directory}") from None
    fileobj = os.fdopen(fd, "wb")
    try:
        yield fileobj
        fileobj.flush()
        os.fsync(fileobj.fileno())
        fileobj.close()
        os.replace(temporary, path)
    except BaseException as exc:
        try:
            fileobj.close()
        except OSError:
            pass                            # the flush of a full disk fails again: already failing
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError):
            raise MigrationError(context, errno=exc.errno) from exc
        raise
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)                # the rename itself survives a crash
        finally:
            os.close(dir_fd)
    except OSError:
        pass                                # the file is complete; some filesystems refuse this


@contextmanager
def _save_exec(uri: MigrationUri) -> Iterator[BinaryIO]:
    context = f"saving to {uri}"
    proc = _start(uri.command, context, stdin=subprocess.PIPE)
    assert proc.stdin is not None
    try:
        yield proc.stdin                    # type: ignore[misc]
        proc.stdin.close()                  # flushes: EPIPE lands in the handler below
    except BaseException as exc:
        try:
            proc.stdin.close()
        except OSError:
            pass
        status = _finish_command(proc, COMMAND_GRACE_S)
        if not isinstance(exc, (KvmpyError, OSError)):
            raise
        if status != 0 or _is_broken_pipe(exc):
            raise MigrationError(context, detail=f"the command {_describe(status)} before "
                                                 "reading the whole stream") from exc
        if isinstance(exc, OSError):
            raise MigrationError(context, errno=exc.errno) from exc
        raise
    status = _finish_command(proc, None)    # the command may still be writing out the stream
    if status != 0:
        raise MigrationError(context, detail=f"the command {_describe(status)}")


@contextmanager
def open_restore_source(uri: str | MigrationUri) -> Iterator[BinaryIO]:
    """A binary file object to read a stream from: file: a regular file (anything else, or a
    missing path, is one MigrationError line, without blocking on a FIFO); exec: the command's
    stdout, and the command's failure (non-zero exit) is reported with its status."""
    parsed = _as_uri(uri)
    context = f"restoring from {parsed}"
    if parsed.scheme == "file":
        fileobj = _open_regular(parsed.path, context)
        with fileobj:
            yield fileobj
        return
    proc = _start(parsed.command, context, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    try:
        yield proc.stdout                   # type: ignore[misc]
    except BaseException as exc:
        proc.stdout.close()
        status = _finish_command(proc, COMMAND_GRACE_S)
        # the command's own failure explains a short or empty stream; SIGPIPE and a kill are ours
        if status in (None, -signal.SIGPIPE, 128 + signal.SIGPIPE) or \
                not isinstance(exc, (KvmpyError, OSError)):
            raise
        if status == 0:                     # e.g. nothing at all: say so, with the status
            raise MigrationError(context, detail=f"{exc}; the command exited with status 0") from exc
        raise MigrationError(context, detail=f"the command {_describe(status)}") from exc
    proc.stdout.close()
    status = _finish_command(proc, COMMAND_GRACE_S)
    # SIGPIPE, or lingering: the reader has what it wanted and stopped; what followed is not needed
    if status is None:
        log.warning("%s: the command was still running after the stream; killed it", context)
    elif status not in (0, -signal.SIGPIPE, 128 + signal.SIGPIPE):
        raise MigrationError(context, detail=f"the command {_describe(status)}")


def _open_regular(path: str, context: str) -> BinaryIO:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise MigrationError(context, errno=exc.errno) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a special file"
            raise MigrationError(context, detail=f"it is {kind}, not a regular file")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
