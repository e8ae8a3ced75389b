from kvmpy.machine.panicwatch import PanicWatch


def test_forwards_everything_and_keeps_the_first_panic_line():
    out = bytearray()
    w = PanicWatch(out.extend)
    text = (b"[    1.0] hello\r\n[    2.0] Kernel panic - not syncing: Attempted to kill init!\r\n"
            b"[    2.1] Kernel panic - not syncing: second\n")
    for i in range(len(text)):
        w.write(text[i:i + 1])
    assert bytes(out) == text
    assert w.line == "Kernel panic - not syncing: Attempted to kill init!"


def test_no_panic_and_long_lines_are_bounded():
    w = PanicWatch(lambda d: None)
    w.write(b"x" * 100000 + b"\n")
    w.write(b"Kernel panic - not syncing")  # no newline yet
    assert w.line is None
    assert len(w._buf) <= 512
