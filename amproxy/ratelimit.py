"""Per-key rate limits that hold however a key's connections spread over the workers.

One token bucket per limited key, kept in anonymous shared memory that the
master maps before it forks (as the connection table in :mod:`balance`), so
every worker takes from the same bucket.  A bucket holds at most one
second's worth of lines (the burst) and refills at the key's rate.

Slots are found by a 64-bit hash of the public key, with linear probing; a
worker remembers each key's slot.  Updates take no lock: two workers taking
from one bucket at the same instant may both succeed, so a key may get a
little more than its rate, never less.  CLOCK_MONOTONIC is the same in every
process, so the refill times are comparable across workers.
"""

import hashlib
import mmap
import struct
import time

# Per slot: the key's hash (0: free), then tokens and the time of the last refill.
_SLOT = struct.Struct("=qdd")
MIN_SLOTS = 1 << 16
_PROBES = 64


def _key_hash(public_key):
    value = int.from_bytes(hashlib.blake2b(public_key, digest_size=8).digest(), "little",
                           signed=True)
    return value or 1  # 0 marks a free slot


class RateTable:
    """Made by the master before it forks; ``take`` is called by the workers."""

    def __init__(self, expected_keys=0):
        slots = MIN_SLOTS
        while slots < 2 * expected_keys:
            slots *= 2
        self.slots = slots
        # Untouched pages of an anonymous mapping cost no memory.
        self._memory = mmap.mmap(-1, slots * _SLOT.size)
        self._hashes = memoryview(self._memory).cast("q")
        self._values = memoryview(self._memory).cast("d")
        self.now = time.monotonic()

    def begin(self):
        """Read the clock once for a batch of lines."""
        self.now = time.monotonic()

    def slot_of(self, public_key):
        """The slot of a key's bucket, claimed on first use."""
        wanted = _key_hash(public_key)
        start = wanted % self.slots
        for probe in range(_PROBES):
            slot = (start + probe) % self.slots
            found = self._hashes[slot * 3]
            if found == wanted:
                return slot
            if found == 0:
                self._hashes[slot * 3] = wanted
                self._values[slot * 3 + 1] = -1.0  # a new bucket: full at first use
                return slot
        return start  # a crowded table: share a bucket rather than fail

    def take(self, slot, rate):
        """Take one line from the bucket of ``slot`` at ``rate`` lines/s; False if empty."""
        values = self._values
        tokens_at, stamp_at = slot * 3 + 1, slot * 3 + 2
        tokens = values[tokens_at]
        if tokens < 0:
            tokens = rate  # first use
        else:
            tokens = min(float(rate), tokens + (self.now - values[stamp_at]) * rate)
        values[stamp_at] = self.now
        if tokens < 1.0:
            values[tokens_at] = tokens
            return False
        values[tokens_at] = tokens - 1.0
        return True


class RateLimiter:
    """A worker's view: each key's rate (its ``max_rate``, else the default) and slot."""

    def __init__(self, table):
        self.table = table
        self.default_rate = 0.0
        self._slots = {}  # public key -> slot; as many as the keys that sent

    def for_batch(self, db, default_rate):
        """What filter_lines asks of each line (None when no key is limited).

        ``default_rate`` is --key-max-rate, which SIGHUP may change.
        """
        if not (default_rate or db.rate_limited):
            return None
        self.default_rate = default_rate
        self.table.begin()
        return self.allows

    def allows(self, public_key, key):
        rate = key.max_rate or self.default_rate
        if not rate:
            return True
        slot = self._slots.get(public_key)
        if slot is None:
            slot = self._slots[public_key] = self.table.slot_of(public_key)
        return self.table.take(slot, rate)
