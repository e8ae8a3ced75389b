"""Tier 0: the QMP protocol state machine, argument checking, HMP and the JSON streamer, without
sockets (kvmpy/monitor/protocol.py, schema.py, commands.py, hmp.py, jsonstream.py)."""
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmpy.errors import KvmpyError
from kvmpy.monitor.commands import Deferred, build_commands
from kvmpy.monitor.jsonstream import JsonStreamer
from kvmpy.monitor.protocol import NEGOTIATION_HINT, QmpSession, event_message, greeting
from support.fake_machine import FakeMachine


@pytest.fixture
def machine():
    m = FakeMachine()
    yield m
    m.close()


@pytest.fixture
def session(machine):
    s = QmpSession(machine)
    reply, _ = s.handle_request({"execute": "qmp_capabilities"})
    assert reply == {"return": {}}
    return s


def run(session, name, arguments=None, **extra):
    request = {"execute": name, **extra}
    if arguments is not None:
        request["arguments"] = arguments
    reply, deferred = session.handle_request(request)
    json.dumps(reply)      # every reply must be JSON
    return reply, deferred


def error_of(reply):
    assert set(reply) <= {"error", "id"}, reply
    return reply["error"]["class"], reply["error"]["desc"]


def test_the_fake_satisfies_the_protocol(machine):
    from kvmpy.monitor.control import MachineControl
    assert isinstance(machine, MachineControl)


def test_greeting_has_qemus_shape():
    g = greeting()
    version = g["QMP"]["version"]
    assert set(version["qemu"]) == {"major", "minor", "micro"}
    assert all(isinstance(v, int) for v in version["qemu"].values())
    assert version["package"].startswith("kvmpy ")
    assert g["QMP"]["capabilities"] == []


def test_commands_before_negotiation_are_refused_with_qemus_hint(machine):
    s = QmpSession(machine)
    reply, _ = s.handle_request({"execute": "query-status", "id": 7})
    assert error_of(reply) == ("CommandNotFound", NEGOTIATION_HINT) and reply["id"] == 7
    reply, _ = s.handle_request({"execute": "stop"})
    assert error_of(reply)[0] == "CommandNotFound" and machine.calls == []
    # a malformed request is a GenericError even before negotiation (as in QEMU)
    assert error_of(s.handle_request([1, 2])[0]) == ("GenericError", "QMP input must be a JSON object")
    reply, _ = s.handle_request({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}})
    assert error_of(reply) == ("GenericError", "Capability oob not available")
    reply, _ = s.handle_request({"execute": "qmp_capabilities", "arguments": {"enable": ["bogus"]}})
    assert error_of(reply) == ("GenericError", "Parameter 'enable[0]' does not accept value 'bogus'")
    assert not s.negotiated
    assert s.handle_request({"execute": "qmp_capabilities", "id": "a"})[0] == {"return": {}, "id": "a"}
    reply, _ = s.handle_request({"execute": "qmp_capabilities"})
    assert error_of(reply) == ("CommandNotFound",
                               "Capabilities negotiation is already complete, command ignored")


@pytest.mark.parametrize("request_, desc", [
    ("x", "QMP input must be a JSON object"),
    ({"execute": 3}, "QMP input member 'execute' must be a string"),
    ({"execute": "stop", "arguments": []}, "QMP input member 'arguments' must be an object"),
    ({"execute": "stop", "extra": 1}, "QMP input member 'extra' is unexpected"),
    ({"exec-oob": "stop"}, "QMP input member 'exec-oob' is unexpected"),
    ({"arguments": {}}, "QMP input lacks member 'execute'"),
])
def test_malformed_requests(session, machine, request_, desc):
    reply, _ = session.handle_request(request_)
    assert error_of(reply) == ("GenericError", desc)
    assert machine.calls == []


def test_id_is_echoed_on_success_and_error(session):
    assert run(session, "query-kvm", id={"any": ["json", 1]})[0] == {
        "return": {"enabled": True, "present": True}, "id": {"any": ["json", 1]}}
    reply, _ = run(session, "nope", id=None)
    assert reply["id"] is None and error_of(reply) == ("CommandNotFound", "The command nope has not been found")


@pytest.mark.parametrize("name, arguments, desc", [
    ("query-status", {"x": 1}, "Parameter 'x' is unexpected"),
    ("human-monitor-command", {}, "Parameter 'command-line' is missing"),
    ("human-monitor-command", {"command-line": 1}, "Invalid parameter type for 'command-line', expected: string"),
    ("human-monitor-command", {"command-line": "info status", "cpu-index": True},
     "Invalid parameter type for 'cpu-index', expected: integer"),
    ("human-monitor-command", {"command-line": "x", "cpu-index": 1 << 70}, "Parameter 'cpu-index' expects int64"),
    ("migrate", {"uri": "file:/x", "detach": "yes"}, "Invalid parameter type for 'detach', expected: boolean"),
    ("migrate", {}, "Parameter 'uri' is missing"),
    ("migrate", {"uri": "ftp:/x"}, "Parameter 'uri' expects a valid migration protocol"),
    ("migrate-set-capabilities", {"capabilities": {}}, "Invalid parameter type for 'capabilities', expected: array"),
    ("migrate-set-capabilities", {"capabilities": [{"capability": "xbzrle"}]},
     "Parameter 'capabilities[0].state' is missing"),
    ("migrate-set-capabilities", {"capabilities": [{"capability": "nope", "state": True}]},
     "Parameter 'capabilities[0].capability' does not accept value 'nope'"),
    ("migrate-set-capabilities", {"capabilities": [{"capability": "xbzrle", "state": True, "x": 1}]},
     "Parameter 'capabilities[0].x' is unexpected"),
    ("migrate-set-parameters", {"downtime-limit": "1"}, "Invalid parameter type for 'downtime-limit', expected: integer"),
    ("migrate-set-parameters", {"downtime-limit": -1}, "Parameter 'downtime-limit' expects uint64"),
    ("migrate-set-parameters", {"downtime-limit": 2_000_001},
     "Parameter 'downtime_limit' expects an integer in the range of 0 to 2000000 ms"),
    ("migrate-set-parameters", {"nonsense": 1}, "Parameter 'nonsense' is unexpected"),
    ("migrate-incoming", {"uri": "defer"}, "'-incoming' was not specified on the command line"),
])
def test_argument_errors_have_qemus_wording_and_change_nothing(session, machine, name, arguments, desc):
    before = (dict(machine.migration_parameters), dict(machine.migration_capabilities))
    reply, deferred = run(session, name, arguments)
    assert error_of(reply) == ("GenericError", desc) and deferred is None
    assert machine.calls == []
    assert (machine.migration_parameters, machine.migration_capabilities) == before


def test_query_commands(session):
    names = [c["name"] for c in run(session, "query-commands")[0]["return"]]
    for name in ("qmp_capabilities", "query-version", "query-status", "query-name", "query-kvm",
                 "query-cpus-fast", "query-block", "stop", "cont", "system_reset",
                 "system_powerdown", "quit", "human-monitor-command", "migrate", "migrate-incoming",
                 "migrate_cancel", "query-migrate", "migrate-set-parameters",
                 "query-migrate-parameters", "migrate-set-capabilities", "query-migrate-capabilities"):
        assert name in names
    assert len(names) == len(set(names))


def test_run_states_through_stop_cont(session, machine):
    assert run(session, "query-status")[0]["return"] == {"status": "running", "running": True, "singlestep": False}
    assert run(session, "stop")[0] == {"return": {}}
    assert run(session, "query-status")[0]["return"] == {"status": "paused", "running": False, "singlestep": False}
    assert run(session, "cont")[0] == {"return": {}}
    assert machine.status == "running" and machine.calls == ["pause", "resume"]
    machine.status = "prelaunch"
    run(session, "cont")
    assert machine.calls[-1] == "start" and machine.status == "running"
    for state in ("shutdown", "guest-panicked", "internal-error"):
        machine.status = state
        assert error_of(run(session, "cont")[0]) == ("GenericError", "Resetting the Virtual Machine is required")


def test_quit_answers_before_it_stops(session, machine):
    reply, deferred = run(session, "quit", id=1)
    assert reply == {"return": {}, "id": 1} and isinstance(deferred, Deferred)
    assert "stop" not in machine.calls
    deferred.then()
    assert machine.calls == ["stop"] and machine.status == "shutdown"


def test_query_name_and_unnamed(machine):
    s = QmpSession(machine)
    s.negotiated = True
    assert s.handle_request({"execute": "query-name"})[0] == {"return": {"name": "fake"}}
    machine.name = None
    assert s.handle_request({"execute": "query-name"})[0] == {"return": {}}


def test_migration_parameters_and_capabilities(session, machine):
    assert run(session, "migrate-set-parameters", {"downtime-limit": 100, "max-bandwidth": 1 << 30})[0] == {"return": {}}
    assert run(session, "query-migrate-parameters")[0]["return"]["downtime-limit"] == 100
    assert machine.migration_parameters["max-bandwidth"] == 1 << 30
    run(session, "migrate-set-capabilities", {"capabilities": [{"capability": "xbzrle", "state": True}]})
    caps = {c["capability"]: c["state"] for c in run(session, "query-migrate-capabilities")[0]["return"]}
    assert caps["xbzrle"] is True and caps["events"] is False
    assert run(session, "migrate", {"uri": "file:/tmp/x"})[0] == {"return": {}}
    assert run(session, "query-migrate")[0]["return"]["status"] == "active"
    assert error_of(run(session, "migrate", {"uri": "file:/tmp/y"})[0]) == (
        "GenericError", "There's a migration process in progress")
    assert error_of(run(session, "migrate-set-capabilities",
                        {"capabilities": [{"capability": "xbzrle", "state": False}]})[0])[1] == \
        "There's a migration process in progress"
    run(session, "migrate_cancel")
    assert run(session, "query-migrate")[0]["return"]["status"] == "cancelled"
    # the machine's own refusal (a KvmpyError) is one GenericError line
    cls, desc = error_of(run(session, "migrate", {"uri": "tcp:127.0.0.1:4444"})[0])
    assert cls == "GenericError" and "live migration is not there yet" in desc
    machine.status = "inmigrate"
    assert run(session, "migrate-incoming", {"uri": "file:/tmp/x"})[0] == {"return": {}}
    assert machine.calls[-1] == "migrate-incoming file:/tmp/x"


def test_a_failing_machine_never_breaks_the_session(session, machine):
    def broken():
        raise RuntimeError("boom")
    machine.reset = broken
    cls, desc = error_of(run(session, "system_reset")[0])
    assert cls == "GenericError" and "internal error in system_reset: RuntimeError: boom" == desc

    def refused():
        raise KvmpyError("resetting", detail="no")
    machine.reset = refused
    assert error_of(run(session, "system_reset")[0]) == ("GenericError", "resetting: no")


def hmp(session, line, **extra):
    reply, _ = run(session, "human-monitor-command", {"command-line": line, **extra})
    return reply


def test_hmp_info_status_and_registers(session, machine):
    assert hmp(session, "info status") == {"return": "VM status: running\r\n"}
    machine.status = "paused"
    assert hmp(session, "info status")["return"] == "VM status: paused\r\n"
    machine.status = "prelaunch"
    assert hmp(session, "info status")["return"] == "VM status: paused (prelaunch)\r\n"
    assert hmp(session, "info registers")["return"].startswith("RAX=0000000000000000")
    assert hmp(session, "info registers", **{"cpu-index": 1})["return"].startswith("RAX=0000000000000001")
    text = hmp(session, "info registers -a")["return"]
    assert "CPU#0\r\n" in text and "CPU#1\r\n" in text and "\n" not in text.replace("\r\n", "")
    assert hmp(session, "info registers 5")["return"] == "CPU#5 not available\r\n"
    assert error_of(hmp(session, "info status", **{"cpu-index": 9})) == (
        "GenericError", "Parameter 'cpu-index' expects a CPU number")
    assert hmp(session, "frobnicate")["return"] == "unknown command: 'frobnicate'\r\n"
    assert hmp(session, "info frob")["return"] == "unknown command: 'info frob'\r\n"
    assert hmp(session, "")["return"] == ""


def test_hmp_actions_run_the_same_commands(session, machine):
    machine.status = "running"
    assert hmp(session, "stop")["return"] == "" and machine.status == "paused"
    hmp(session, "c")
    assert machine.status == "running"
    hmp(session, "system_reset")
    assert machine.calls == ["pause", "resume", "reset"]
    machine.status = "shutdown"
    assert hmp(session, "cont")["return"] == "Error: Resetting the Virtual Machine is required\r\n"


def test_event_message_timestamp():
    m = event_message("SHUTDOWN", {"guest": True, "reason": "guest-shutdown"}, now=1234.5678)
    assert m == {"event": "SHUTDOWN", "data": {"guest": True, "reason": "guest-shutdown"},
                 "timestamp": {"seconds": 1234, "microseconds": 567800}}
    assert "data" not in event_message("STOP", {})


# ---- the JSON streamer -----------------------------------------------------------------
def feed_all(chunks, **kw):
    s = JsonStreamer(**kw)
    out = []
    for c in chunks:
        out += s.feed(c)
    return out


def test_streamer_splits_like_qemu():
    assert feed_all([b'{"a": 1}{"b": [2, {"c": "}"}]}\n  "s\\"x" 42 ']) == [
        ("message", {"a": 1}), ("message", {"b": [2, {"c": "}"}]}), ("message", 's"x'), ("message", 42)]


def test_streamer_recovers_from_garbage():
    items = feed_all([b'garbage\n{"ok": 1}\n{"x": \x01 junk junk\n{"ok": 2}\n\xff\xfe{"ok": 3}'])
    kinds = [k for k, _ in items]
    assert items[0] == ("error", "JSON parse error, expecting value")
    assert ("message", {"ok": 1}) in items and ("message", {"ok": 2}) in items and ("message", {"ok": 3}) in items
    assert kinds.count("error") == 3


@pytest.mark.parametrize("raw, desc", [
    (b'{"a": "\xc3\x28"}', "JSON parse error, invalid UTF-8 sequence in string"),
    (b'{"a": NaN}', "JSON parse error, invalid keyword 'NaN'"),
    (b'{"a": 1, "a": 2}', "JSON parse error, duplicate key 'a'"),
    (b'{"a" 1}', "JSON parse error, expecting ':' delimiter"),
])
def test_streamer_rejects_what_qemu_rejects(raw, desc):
    assert feed_all([raw, b'{"next": true}']) == [("error", desc), ("message", {"next": True})]


def test_streamer_bounds_size_and_depth():
    huge = b'{"execute": "x", "arguments": {"a": "' + b"A" * (3 << 20) + b'"}}\n{"ok": 1}\n'
    items = feed_all([huge[i:i + 65536] for i in range(0, len(huge), 65536)], max_message_bytes=1 << 20)
    assert items[0] == ("error", "JSON token size limit exceeded") and items[-1] == ("message", {"ok": 1})
    deep = b"[" * 2000 + b"]" * 2000 + b'\n{"ok": 1}'
    items = feed_all([deep])
    assert items[0] == ("error", "JSON nesting depth limit exceeded") and items[-1] == ("message", {"ok": 1})


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=20),
       st.lists(st.integers(1, 40), max_size=10))
@settings(max_examples=150, deadline=None)
def test_streamer_result_does_not_depend_on_chunking(value, cuts):
    doc = {"v": value}
    raw = json.dumps(doc).encode() * 2
    chunks, pos = [], 0
    for cut in cuts:
        chunks.append(raw[pos:pos + cut])
        pos += cut
    chunks.append(raw[pos:])
    assert feed_all(chunks) == [("message", doc), ("message", doc)]


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_streamer_survives_any_bytes(data):
    items = feed_all([data, b'\x04\n{"resync": 1}'])
    assert all(kind in ("message", "error") for kind, _ in items)
    assert items[-1] == ("message", {"resync": 1})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=15)
command_names = st.sampled_from(sorted(build_commands()) + ["qmp_capabilities", "query-commands", "nope"])


@given(st.one_of(json_values,
                 st.fixed_dictionaries({"execute": command_names},
                                       optional={"arguments": st.dictionaries(
                                           st.sampled_from(["uri", "command-line", "cpu-index", "capabilities",
                                                            "downtime-limit", "detach", "enable", "x"]),
                                           json_values, max_size=3), "id": json_values})))
@settings(max_examples=400, deadline=None)
def test_session_answers_any_json_with_one_reply(request_):
    machine = FakeMachine(tick_s=1.0)
    machine.stop = lambda: None          # a random `quit` must not end the fake for later examples
    try:
        for negotiated in (False, True):
            s = QmpSession(machine)
            s.negotiated = negotiated
            reply, _ = s.handle_request(request_)
            json.dumps(reply)
            assert ("return" in reply) != ("error" in reply)
            if "error" in reply:
                assert set(reply["error"]) == {"class", "desc"}
                assert reply["error"]["class"] in ("GenericError", "CommandNotFound")
                assert not reply["error"]["desc"].startswith("internal error"), reply
    finally:
        machine.close()
