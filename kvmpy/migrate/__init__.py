"""kvmpy.migrate: snapshots (static migration) and live pre-copy migration.

- codec.py   state values (plain data and @versioned dataclasses, kvmpy/state.py) to bytes and
             back, without pickle: the decoder is written for untrusted input
- stream.py  the stream layout (header, typed sections with crc32, END) and StreamWriter;
             guest memory as a sparse page-aligned image in a file (mapped on restore) or as
             bounded chunks of page runs through a pipe or socket
- reader.py  StreamReader: sections in order, memory copied into RAM or mapped from the file
- pages.py   zero-page detection (numpy), page runs, the RAM range checksum
- uri.py     file:, exec: save targets and restore sources; tcp:, unix: parsed for live.py
- precopy.py live pre-copy engine (source side) over a Channel, against a PrecopySource; the
             destination's read of a live stream; convergence and auto-converge arithmetic
- block.py   block migration (the `block` capability): the DISK section codec, the source's
             bulk and dirty-block passes over the writable drives, the destination's receiver
- live.py    a Machine as the PrecopySource, tcp:/unix: connect/accept (above kvmpy.machine:
             Machine.migrate/incoming import it when called)
- incoming.py the destination's incoming path (live.incoming_live calls it)
- filemap.py the file layout's RAM ranges: checked, mapped copy-on-write, verified
- channel.py the connection and the one-line replies; converge.py the pass arithmetic

The rest it builds on: VcpuState (kvmpy.vcpu.state), each part's state()/restore(), and dirty
logging/rings in kvmpy.ioctl + kvmpy.memslots.dirty. Nothing is imported here, so importing one
module does not pull numpy or subprocess into a start-up that does not need them.
"""
