"""The destination's read of a live migration stream that stops arriving (tier 2's fault matrix:
the link between the two hosts set down in the bulk copy). The socket's timeout is an OSError
without an errno, and the error line used to end at "reading the migration stream at byte N",
naming no reason. Nothing here waits on how fast the host runs: nothing ever arrives, so the
(short) timeout always fires."""
from __future__ import annotations

import errno
import io
import socket

import pytest

from kvmpy.errors import MigrationError
from kvmpy.migrate.reader import StreamReader
from kvmpy.migrate.stream import StreamWriter


def header_bytes() -> bytes:
    out = io.BytesIO()
    StreamWriter(out, sparse=False).write_header()
    return out.getvalue()


def test_nothing_arriving_is_named_as_a_timeout():
    a, b = socket.socketpair()
    with a, b:
        b.settimeout(0.01)
        with pytest.raises(MigrationError) as caught:
            StreamReader(b.makefile("rb"))
    assert caught.value.errno is None
    assert str(caught.value) == ("reading the migration stream at byte 0: nothing arrived in time "
                                 "(is the source, or the connection to it, gone?)")


def test_a_stream_stalling_mid_section_says_where_and_why():
    a, b = socket.socketpair()
    with a, b:
        head = header_bytes()
        a.sendall(head + b"\x04\0\0")            # a section header cut short
        b.settimeout(0.01)
        reader = StreamReader(b.makefile("rb"))
        with pytest.raises(MigrationError, match=rf"at byte {len(head)}: nothing arrived in time"):
            reader.next_section()


class ResetStream(io.RawIOBase):
    """A peer that reset the connection: an OSError with an errno, which stays the reason."""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")


def test_an_error_with_an_errno_keeps_it_and_adds_nothing():
    with pytest.raises(MigrationError) as caught:
        StreamReader(ResetStream())
    assert caught.value.errno == errno.ECONNRESET and caught.value.detail is None
    assert str(caught.value) == "reading the migration stream at byte 0: Connection reset by peer (ECONNRESET)"
