"""The QMP parser and dispatcher: bytes as a client sends them (split at input-chosen points)
go through the JSON streamer (kvmpy/monitor/jsonstream.py) into a QMP session
(kvmpy/monitor/protocol.py) over tests/support's FakeMachine, with every command reachable.
Oracle: nothing escapes handle() (the server relies on it), every reply is a JSON-serialisable
object with exactly one of "return"/"error" (an error with a class and a description), a
command that fails inside kvmpy with anything but a KvmpyError is logged as an internal error,
which common.InternalErrorFinding turns into a finding, and the streamer never holds more than
its message limit.
"""
from __future__ import annotations

import json

import common

with common.instrumented("kvmpy.monitor"):
    from kvmpy.errors import KvmpyError
    from kvmpy.monitor.jsonstream import JsonStreamer
    from kvmpy.monitor.commands import build_commands
    from kvmpy.monitor.protocol import QmpSession

import atheris
from support.fake_machine import FakeMachine

MAX_MESSAGE = 4096
TABLE = build_commands()                   # immutable: shared by every input's session
MACHINE = FakeMachine(tick_s=3600.0)       # one machine: its ticker thread is not per input
FRESH = {k: v for k, v in vars(MACHINE).items() if k in ("status", "migration_parameters", "migration_capabilities")}
COMMANDS = [b'{"execute":"qmp_capabilities"}', b'{"execute":"query-status"}', b'{"execute":"stop"}',
            b'{"execute":"cont"}', b'{"execute":"migrate","arguments":{"uri":"exec:true"}}',
            b'{"execute":"human-monitor-command","arguments":{"command-line":"info status"}}',
            b'{"execute":"migrate-set-parameters","arguments":{"downtime-limit":1}}',
            b'{"execute":"query-migrate"}', b'{"execute":"system_reset"}', b'{"execute":"quit","id":7}']


HMP_WORDS = ["", "info ", "info status", "stop", "cont", "migrate ", "migrate_set_parameter ", "info migrate",
             "system_reset", "q", "help "]


def reset_machine() -> None:
    for key, value in FRESH.items():
        setattr(MACHINE, key, dict(value) if isinstance(value, dict) else value)
    MACHINE.calls.clear()
    MACHINE._migration = {}


def check_reply(reply: object) -> None:
    if not isinstance(reply, dict) or ("return" in reply) == ("error" in reply):
        raise AssertionError(f"malformed reply {reply!r}")
    if "error" in reply:
        err = reply["error"]
        if not isinstance(err, dict) or not isinstance(err.get("class"), str) or not isinstance(err.get("desc"), str):
            raise AssertionError(f"malformed error {reply!r}")
    json.dumps(reply, allow_nan=False)


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    reset_machine()
    streamer = JsonStreamer(max_message_bytes=MAX_MESSAGE, max_depth=fdp.ConsumeIntInRange(1, 64))
    session = QmpSession(MACHINE, TABLE)
    session.negotiated = fdp.ConsumeBool()
    try:
        while fdp.remaining_bytes():
            pick = fdp.ConsumeIntInRange(0, 7)
            if pick <= 1:
                chunk = COMMANDS[fdp.ConsumeIntInRange(0, len(COMMANDS) - 1)]
            elif pick == 2:                  # an HMP command line, the other parser behind QMP
                line = fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 40))
                chunk = json.dumps({"execute": "human-monitor-command",
                                    "arguments": {"command-line": HMP_WORDS[len(line) % len(HMP_WORDS)] + line}}).encode()
            else:
                chunk = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 64))
            for item in streamer.feed(chunk):
                reply, deferred = session.handle(item)
                check_reply(reply)
                if deferred is not None:
                    deferred.then()
            if len(streamer._buf) > MAX_MESSAGE:
                raise AssertionError(f"the streamer holds {len(streamer._buf)} bytes, over its {MAX_MESSAGE} limit")
    except KvmpyError:
        pass


def seeds() -> common.Seeds:
    yield b"\x00\x01" + b"".join(COMMANDS)
    yield b'\x01\x00{"execute":"qmp_capabilities"}{"execute":"query-commands"}'


if __name__ == "__main__":
    common.main(test_one_input, seeds)
