"""QEMU's option-string syntax, shared by every flag that takes one (--drive, --nic, --device,
--fw-cfg, --initrd's module list): `key=value` parts split at single commas, `,,` a literal comma.
One implementation, so a path with a comma means the same thing in every flag."""
from __future__ import annotations


def split_options(text: str) -> list[str]:
    """Split QEMU-style options at single commas; ",," is a literal comma (QEMU's escaping), so
    `file=a,,b.img` names the file "a,b.img" and a path with a comma can be given at all."""
    parts: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(text):
        if text[i] == ",":
            if text.startswith(",,", i):
                current.append(",")
                i += 2
                continue
            parts.append("".join(current))
            current = []
        else:
            current.append(text[i])
        i += 1
    parts.append("".join(current))
    return parts
