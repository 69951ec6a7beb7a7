"""Request ids: UUIDv7 (RFC 9562), time-ordered so usage events sort by when they happened."""

from __future__ import annotations

import random
import time

# Ids need to be unique, not secret: the process-seeded generator spares a syscall per request
# that os.urandom would cost.
_random = random.Random()


def uuid7() -> str:
    ms = time.time_ns() // 1_000_000
    rand = _random.getrandbits(74)
    value = (ms & 0xFFFF_FFFF_FFFF) << 80 | 0x7 << 76 | (rand >> 62) << 64
    value |= 0b10 << 62 | rand & 0x3FFF_FFFF_FFFF_FFFF
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
