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
import logging
import mmap
import struct
import time

log = logging.getLogger(__name__)

# Per slot: the key's hash (0: free), then tokens and the time of the last refill.
_SLOT = struct.Struct("=qdd")
MIN_SLOTS = 1 << 16
# Keys the auth file may gain by reloads, beyond this many times those at start.
HEADROOM = 4
_PROBES = 64
# Lines of rate-limited keys remembered to refuse replays (16 bytes each, shared by
# the workers): four slots per line the limits allow in a window, within these bounds.
MIN_REPLAY_SLOTS = 1 << 20
MAX_REPLAY_SLOTS = 1 << 23


def _key_hash(public_key):
    value = int.from_bytes(hashlib.blake2b(public_key, digest_size=8).digest(), "little",
                           signed=True)
    return value or 1  # 0 marks a free slot


class RateTable:
    """Made by the master before it forks; ``take`` is called by the workers."""

    def __init__(self, expected_keys=0, replay_lines=0):
        """``replay_lines``: the lines the keys' limits allow in a replay window."""
        slots = MIN_SLOTS
        while slots < HEADROOM * expected_keys:
            slots *= 2
        self.slots = slots
        # Untouched pages of an anonymous mapping cost no memory.
        self._memory = mmap.mmap(-1, slots * _SLOT.size)
        self._hashes = memoryview(self._memory).cast("q")
        self._values = memoryview(self._memory).cast("d")
        self.now = time.monotonic()
        self._crowded_logged = False
        self.replays = ReplayTable(replay_slots(replay_lines))

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
                if self._hashes[slot * 3] != wanted:
                    continue  # another worker claimed it at the same instant
                self._values[slot * 3 + 1] = -1.0  # a new bucket: full at first use
                return slot
        if not self._crowded_logged:
            self._crowded_logged = True
            log.warning("the rate limit table is full: some keys share a bucket until "
                        "amproxy restarts", extra={"slots": self.slots})
        return start

    def available(self, slot, rate):
        """Lines the bucket of ``slot`` holds now, at ``rate`` lines/s (refilled to now).

        It holds one second's worth, and at least one line (a rate below 1/s
        lets a line through every 1/rate seconds).
        """
        values = self._values
        burst = max(1.0, float(rate))
        tokens = values[slot * 3 + 1]
        if tokens < 0:
            return burst  # first use: a full bucket
        # A batch that began before another worker's last update refills nothing.
        return min(burst, tokens + max(0.0, self.now - values[slot * 3 + 2]) * rate)

    def spend(self, slot, rate, lines):
        """Take ``lines`` from the bucket (what another worker took meanwhile counts too)."""
        values = self._values
        values[slot * 3 + 1] = max(0.0, self.available(slot, rate) - lines)
        values[slot * 3 + 2] = max(self.now, values[slot * 3 + 2])


class RateLimiter:
    """A worker's side: each key's rate (its ``max_rate``, else the default) and slot.

    For a batch of lines, :func:`amproxy.protocol.filter_lines` asks once per
    key what it may send (``budget``), counts down locally, and reports what
    was spent (``spend``): the shared memory is read and written once per
    key and batch, not per line.  Two workers whose batches of one key
    overlap may both spend the same tokens; in a flood the bucket is nearly
    empty, so that costs little.
    """

    def __init__(self, table):
        self.table = table
        self.default_rate = 0.0
        self._slots = {}  # public key -> slot; as many as the keys that sent
        self._granted = {}  # public key -> (slot, rate, budget) for this batch

    def for_batch(self, db, default_rate):
        """The limiter for one batch, or None when no key is limited.

        ``default_rate`` is --key-max-rate, which SIGHUP may change.
        """
        if not (default_rate or db.rate_limited):
            return None
        self.default_rate = default_rate
        self.table.begin()
        self._granted.clear()
        return self

    def budget(self, public_key, key):
        rate = key.max_rate or self.default_rate
        if not rate:
            return float("inf")
        slot = self._slots.get(public_key)
        if slot is None:
            slot = self._slots[public_key] = self.table.slot_of(public_key)
        budget = self.table.available(slot, rate)
        self._granted[public_key] = (slot, rate, budget)
        return budget

    def spend(self, left):
        """``left``: public key -> lines its budget still held at the end of the batch."""
        for public_key, (slot, rate, budget) in self._granted.items():
            self.table.spend(slot, rate, budget - left[public_key])
        self._granted.clear()



def replay_slots(lines):
    """Slots for ``lines`` remembered at once: four each, as a power of two, bounded."""
    slots = MIN_REPLAY_SLOTS
    while slots < 4 * lines and slots < MAX_REPLAY_SLOTS:
        slots *= 2
    return slots


class ReplayTable:
    """The lines accepted for rate-limited keys while they could be replayed.

    A signed line passes while its timestamp is within --skew of now, so a
    captured line re-sent a hundred times a second would drain its key's
    bucket.  (brubeck's statsd-secure keeps such a cache.)  Each accepted line
    is remembered, by the hash of its signature, for as long as it could pass
    again (twice the skew), in shared memory made before the fork, so
    a replay to another worker is seen too.  The table has a fixed size: when a
    line finds its two slots taken, it takes the older one (said
    in a warning, at most once a minute).  Two workers accepting the same line
    at the same instant may both pass it.
    """

    def __init__(self, slots=MIN_REPLAY_SLOTS):
        # Per slot: the hash, and when it was accepted (Unix time; 0: never); two a place.
        self._memory = mmap.mmap(-1, slots * 16)
        self._cells = memoryview(self._memory).cast("q")
        self._mask = slots // 2 - 1
        self.evicted = 0
        self._evicted_logged_at = None

    def replayed(self, fingerprint, now, window, remember=True):
        """Whether the line was accepted within the last ``window`` seconds; if not, and
        ``remember``, it is remembered as accepted ``now``.

        A line has one place, a pair of slots (two probes at most: this runs for
        every line of a limited key).  A new line takes the one that is free or
        past the window, else the older one: then an accepted line is forgotten
        early (counted), which is rare while the table is far from full.  The
        window is the one in force now, so a larger --skew keeps lines longer.
        """
        cells = self._cells
        first = (fingerprint & self._mask) << 2
        since = now - window
        first_at, second_at = cells[first + 1], cells[first + 3]
        if (first_at >= since and cells[first] == fingerprint) or (
                second_at >= since and cells[first + 2] == fingerprint):
            return True
        if remember:
            slot = first if first_at <= second_at else first + 2
            if cells[slot + 1] >= since:
                self._log_eviction(now)
            cells[slot] = fingerprint
            cells[slot + 1] = now
        return False

    def _log_eviction(self, now):
        self.evicted += 1
        if self._evicted_logged_at is None or now - self._evicted_logged_at >= 60:
            self._evicted_logged_at = now
            log.warning("an accepted line of a rate-limited key was forgotten before its "
                        "window ended (the table of recent lines is crowded): it may pass "
                        "once more if it is replayed", extra={"slots": 2 * (self._mask + 1),
                                                              "forgotten": self.evicted})
