"""Event ids: random version-4 UUIDs as 32 hex digits, as ``uuid.uuid4().hex`` makes them.

``uuid.uuid4()`` reads 16 bytes from the kernel for every id. That system call lets go of the
interpreter lock, and on a busy gateway the event loop then waits for a storage thread to hand
the lock back: measured, a quarter of a millisecond per postback. Here the random bytes are read
256 ids at a time; the pool is emptied in a forked child, so no two processes hand out the same
bytes.
"""

from __future__ import annotations

import os

_BATCH = 256
_VERSION_4 = 4 << 76  # the version nibble of a version-4 UUID
_VARIANT_RFC4122 = 0x8000 << 48
_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))

_pool: list[int] = []


def _refill() -> None:
    data = os.urandom(16 * _BATCH)
    _pool.extend(
        int.from_bytes(data[i : i + 16], "big") & _CLEAR | _VERSION_4 | _VARIANT_RFC4122
        for i in range(0, len(data), 16)
    )


def _forget() -> None:
    _pool.clear()


os.register_at_fork(after_in_child=_forget)


def new_event_id() -> str:
    """A new random (version 4) UUID as 32 lower-case hex digits."""
    while True:
        try:
            return f"{_pool.pop():032x}"
        except IndexError:  # empty (another thread may have taken the last one meanwhile)
            _refill()
