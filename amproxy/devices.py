"""What each device (auth-file key) did since amproxy started, shared by the workers.

Per key: lines accepted, when the last was accepted, when the last was
rejected and why, lines rejected per reason, when the current run of
rejections began, the clock offset of the last ``skew`` rejection, whether
the last ``badSignature`` line was signed with the key's previous secret, the
address and listener it last connected from, and whether it is connected
now.  No secret, signature, metric name or value is kept.

The table is a memfd the master maps (MAP_SHARED) before it forks, so every
worker writes the same slots.  A slot is found by a 64-bit blake2b hash of
the public key, with linear probing (256 probes, modulo the slot count); each
process remembers the slots of the keys it used and checks the slot still
holds the key's hash before each use.  A worker writes once a second, a batch
for every key it saw, holding a POSIX record lock on the memfd (per process,
so forked workers exclude each other).  Readers (the master, a child
answering a query) take no lock: a slot read during an update may mix two
seconds' values, never two keys'.

Slot layout (``_SLOT``, 104 bytes with the ten reasons of
:data:`amproxy.protocol.REJECTION_REASONS`; 1.5 slots a key, so 100,000 keys
take 150,000 slots = 15,600,000 bytes)::

    0  q    hash of the public key (0: free, _TOMBSTONE: forgotten)
    8  Q    lines accepted
    16 I    last accepted       (epoch seconds, 0: never)
    20 I    rejected since      (first rejection after the last acceptance; 0: none)
    24 I    last rejected       (0: never)
    28 i    skew of the last skew rejection (s, + device ahead; valid if _HAS_SKEW)
    32 I    connected: one bit per worker (worker % 32)
    36 B    last reason (index in REJECTION_REASONS + 1; 0: none)
    37 B    listener (0: unknown, 1: plain, 2: tls)
    38 B    flags (_OLD_SECRET, _HAS_SKEW, _HAS_ADDRESS)
    40 16s  address (IPv6 packed; IPv4 as IPv4-mapped IPv6)
    56 I*n  lines rejected per reason (saturate at 2**32 - 1)
    ...I    when the address was seen (1/100 s since the table was made; a newer one
            replaces it, whatever worker says so)

Times are whole seconds (a record's time, or a rejection's, rounded down).
"""

import array
import fcntl
import hashlib
import ipaddress
import itertools
import logging
import math
import mmap
import os
import socket
import struct
import time
from typing import NamedTuple, Optional

from .protocol import BAD_SIGNATURE, REJECTION_REASONS, SKEW, UNKNOWN_KEY

log = logging.getLogger(__name__)

# At least 65,536 slots (6.8 MB): a package starts with no key, and the keys added
# after the start must find room (about 43,000 at 2/3 load); a bigger file gets
# 1.5 slots a key at the start.
MIN_SLOTS = 1 << 16
# Linear probing at 2/3 load displaces some of 100,000 keys by more than 64 slots
# (51 to 83 in simulations): 256 leaves room.
_PROBES = 256
_TOMBSTONE = -(1 << 63)
_WORKER_BITS = 32

_OLD_SECRET = 1
_HAS_SKEW = 2
_HAS_ADDRESS = 4

_LISTENERS = (None, "plain", "tls")
_REASON_INDEX = {reason: index for index, reason in enumerate(REJECTION_REASONS)}
_MAX_COUNT = (1 << 32) - 1
_SKEW_MIN, _SKEW_MAX = -(1 << 31), (1 << 31) - 1
_FULL_LOG_INTERVAL = 60.0
# A process remembers the hash and slot of at most this many keys (then starts again).
_CACHED_KEYS = 20000
# A key that found no slot is not looked for again (a full probe) for this long.
_MISS_RETRY = 60.0


def _slot_struct():
    fields = "=qQIIIiIBBBx16s%dII" % len(REJECTION_REASONS)
    padding = -struct.calcsize(fields) % 8  # slots 8-aligned: the hash is a 'q' item
    return struct.Struct(fields + "x" * padding)


_SLOT = _slot_struct()
SLOT_SIZE = _SLOT.size
# Indexes in 4-byte ('I'/'i') units from a slot's start.
_U32_PER_SLOT = SLOT_SIZE // 4
_Q_PER_SLOT = SLOT_SIZE // 8
_LAST_ACCEPTED, _REJECTED_SINCE, _LAST_REJECTED, _SKEW_AT, _WORKERS = 4, 5, 6, 7, 8
_COUNTS = 14
_SOURCE_AT = _COUNTS + len(REJECTION_REASONS)
# Byte offsets.
_REASON_OFFSET, _LISTENER_OFFSET, _FLAGS_OFFSET = 36, 37, 38
_ADDRESS_OFFSET = 40
# The offsets above are those of _SLOT.
assert struct.calcsize(_SLOT.format[:_SLOT.format.index("16s")]) == _ADDRESS_OFFSET
assert struct.calcsize(_SLOT.format[:_SLOT.format.index("16s") + 3]) == _COUNTS * 4


def _key_hash(public_key):
    value = int.from_bytes(hashlib.blake2b(public_key, digest_size=8).digest(), "little",
                           signed=True)
    if value == 0 or value == _TOMBSTONE:
        return 1  # 0 marks a free slot, _TOMBSTONE a forgotten one
    return value


_IPV4_MAPPED = b"\0" * 10 + b"\xff\xff"


def _packed_address(text):
    """16 bytes for an address's text, or None when it is not an IP address."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if address.version == 4:
        return _IPV4_MAPPED + address.packed
    return address.packed


def _address_text(packed):
    if packed[:12] == _IPV4_MAPPED:  # most devices: the quick way
        return socket.inet_ntop(socket.AF_INET, packed[12:])
    return str(ipaddress.IPv6Address(packed))  # as the rest of amproxy writes it


class Rejections:
    """A worker's tally of one key's rejected lines between two records."""

    __slots__ = ("counts", "last_reason", "last_at", "first_at", "skew", "old_secret")

    def __init__(self):
        self.counts = {}  # reason -> lines
        self.last_reason = None
        self.last_at = 0.0
        self.first_at = None  # the earliest rejection of the tally
        self.skew = None  # of the last skew rejection: s, + when the device is ahead
        self.old_secret = False  # the last badSignature line was signed with the old secret

    def add(self, reason, at, skew=None, old_secret=False, lines=1):
        """``lines`` lines rejected for ``reason`` at ``at`` (epoch seconds).

        ``skew``: for a skew rejection, the line's time minus the proxy's;
        ``old_secret``: for a badSignature one, the key's previous secret signs it.
        """
        if reason not in _REASON_INDEX:
            raise ValueError("not a rejection reason: %r" % (reason,))
        self.counts[reason] = self.counts.get(reason, 0) + lines
        if at >= self.last_at:
            self.last_at = at
            self.last_reason = reason
        if self.first_at is None or at < self.first_at:
            self.first_at = at
        if reason == SKEW and skew is not None:
            self.skew = skew
        if reason == BAD_SIGNATURE:
            self.old_secret = bool(old_secret)


class DeviceState(NamedTuple):
    """A key's state, as ``amproxy devices`` shows it (its fields are the JSON's, in order)."""
    key: str  # the public key, as text
    accepted: int = 0
    last_accepted: Optional[float] = None
    last_rejected: Optional[float] = None
    last_reason: Optional[str] = None
    rejected_since: Optional[float] = None
    rejected: dict = {}  # reason -> lines; never changed in place
    skew: Optional[int] = None
    old_secret: bool = False
    previous_secret_expires: Optional[float] = None  # from the auth file, not the table
    address: Optional[str] = None
    listener: Optional[str] = None
    connected: bool = False
    tracked: bool = True  # False: the table had no slot left for it (see "full")


class SharedSlots:
    """Fixed-size slots in memory the workers share, found by a hash of the public key
    (linear probing), written under a lock that excludes the other workers."""

    def __init__(self, expected_keys, public_keys=()):
        """Sized for ``expected_keys``; ``public_keys``: the auth file's (see ``current``)."""
        self.capacity = max(MIN_SLOTS, math.ceil(1.5 * expected_keys))
        self.size = self.capacity * SLOT_SIZE
        self.created = time.time()
        self.full_misses = 0
        self._full_logged_at = None
        self._fd = os.memfd_create("amproxy-devices", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self._fd, self.size)
            self._memory = mmap.mmap(self._fd, self.size, flags=mmap.MAP_SHARED,
                                     prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self._fd)
            raise
        self._bytes = memoryview(self._memory)
        self._q = self._bytes.cast("q")
        self._Q = self._bytes.cast("Q")
        self._u32 = self._bytes.cast("I")
        self._i32 = self._bytes.cast("i")
        # Per process (copied at fork, then each process's own).
        # The hashes of the auth file's keys, as numbers (8 bytes a key, not a name and
        # a number in a dict: 100,000 keys cost the master 12 MB more at each reload).
        self.current = array.array("q", map(_key_hash, public_keys))
        # This process's keys (a worker's: those it recorded), at most _CACHED_KEYS.
        self._hashes = {}  # public key -> hash
        self._slots = {}  # public key -> slot it was found in
        self._marked = {}  # worker -> keys it marked connected at its last record
        self._addresses = {}  # address text -> packed (None: not an IP address)
        self._address_texts = {}  # packed -> address text
        self._missed = {}  # public key -> when it last found the table full

    # -- slots

    def _hash(self, public_key):
        value = self._hashes.get(public_key)
        if value is None:
            if len(self._hashes) >= _CACHED_KEYS:  # a fleet's keys, each worker seeing most
                self._hashes.clear()
                self._slots.clear()
            value = self._hashes[public_key] = _key_hash(public_key)
        return value

    def _slot(self, public_key, claim, now=None):
        """The key's slot; None when it has none (and ``claim`` is false, or the table is full)."""
        wanted = self._hash(public_key)
        q = self._q
        slot = self._slots.get(public_key)
        if slot is not None and q[slot * _Q_PER_SLOT] == wanted:
            return slot
        if claim and public_key in self._missed:
            if now is not None and now - self._missed[public_key] < _MISS_RETRY:
                self._full(now)
                return None
            del self._missed[public_key]
        capacity = self.capacity
        start = wanted % capacity
        free = None
        for probe in range(_PROBES):
            slot = (start + probe) % capacity
            found = q[slot * _Q_PER_SLOT]
            if found == wanted:
                self._slots[public_key] = slot
                return slot
            if found == 0:
                if free is None:
                    free = slot
                break
            if found == _TOMBSTONE and free is None:
                free = slot
        if not claim:
            return None
        if free is None:
            if len(self._missed) > 200000:
                self._missed.clear()
            self._missed[public_key] = time.time() if now is None else now
            self._full(now)
            return None
        offset = free * SLOT_SIZE
        self._bytes[offset + 8:offset + SLOT_SIZE] = bytes(SLOT_SIZE - 8)
        q[free * _Q_PER_SLOT] = wanted  # last: a reader never sees another key's values
        self._slots[public_key] = free
        return free

    def _full(self, now):
        self.full_misses += 1
        now = time.time() if now is None else now
        if self._full_logged_at is None or now - self._full_logged_at >= _FULL_LOG_INTERVAL:
            self._full_logged_at = now
            log.warning("the device table is full: keys without a slot are not tracked "
                        "(amproxy devices says which); it was sized for the auth file's "
                        "keys at start: restart amproxy (or upgrade it in place, SIGUSR2) "
                        "to size it for the keys added since",
                        extra={"slots": self.capacity, "misses": self.full_misses})

    # -- locking

    def _lock(self):
        fcntl.lockf(self._fd, fcntl.LOCK_EX)

    def _lock_briefly(self, timeout=1.0):
        """The lock, waiting at most ``timeout`` s (the master must not hang on a stopped
        worker); whether it was taken.  What the callers write is safe without it."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except OSError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.005)

    def _unlock(self):
        fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def forget_except(self, public_keys):
        """Drop the state of every key not in ``public_keys`` (after a reload, in the master).

        Slots are marked forgotten, not freed, so no other key's chain of probes
        is cut; a new key reuses them.  Takes the workers' lock, waiting at most
        a second (without it, a worker writing into a slot being forgotten leaves
        values a claim clears).
        """
        current = array.array("q", map(_key_hash, public_keys))
        wanted = set(current)
        q = self._q
        view = self._bytes
        locked = self._lock_briefly()
        forgotten = 0
        try:
            hashes = q[::_Q_PER_SLOT].tolist()
            for slot, found in enumerate(hashes):
                if found != 0 and found != _TOMBSTONE and found not in wanted:
                    q[slot * _Q_PER_SLOT] = _TOMBSTONE
                    offset = slot * SLOT_SIZE
                    view[offset + 8:offset + SLOT_SIZE] = bytes(SLOT_SIZE - 8)
                    forgotten += 1
        finally:
            if locked:
                self._unlock()
        self.current = current
        self._hashes = {k: h for k, h in self._hashes.items() if h in wanted}
        self._slots = {k: s for k, s in self._slots.items() if k in self._hashes}
        return forgotten

    def close(self):
        if self._memory is None:
            return
        for view in (self._q, self._Q, self._u32, self._i32, self._bytes):
            view.release()
        self._memory.close()
        self._memory = None
        os.close(self._fd)


class DeviceTable(SharedSlots):
    """Made by the master before it forks; ``record`` is called by the workers."""

    # -- writers

    def record(self, worker, now, accepted, rejected, connected, came_from=None):
        """A worker's last second: call once a second, from worker number ``worker``.

        ``now``: epoch seconds.  ``accepted``: {public key: lines accepted since
        the last record}.  ``rejected``: {public key: :class:`Rejections`} for
        the keys with rejected lines since.  ``connected``: {public key:
        (address text, tls)} for every key this worker has an open connection
        for now; a key this worker marked connected before that is missing is
        marked disconnected (by this worker).  Give only keys of the auth file:
        a tally of unknownKey lines alone claims no slot, but any other key
        does.  The first record of a worker in a process clears what a previous
        process of the same number (worker % 32) left marked connected.
        ``came_from``: {public key: (address text, tls, when)} for keys whose
        connections closed since: where they last came from, unless the table
        knows a newer source (``connected`` is as of ``now``).
        """
        self._lock()
        try:
            self._record_accepted(accepted, now)
            for public_key, tally in rejected.items():
                if tally.counts:
                    # unknownKey lines alone: not a device of the auth file
                    claim = len(tally.counts) > 1 or UNKNOWN_KEY not in tally.counts
                    slot = self._found(public_key, claim, now)
                    if slot is not None:
                        self._record_rejections(slot, tally, now,
                                                accepted.get(public_key, 0) > 0)
            self._record_sources(worker, connected, came_from or {}, now)
        finally:
            self._unlock()

    def _found(self, public_key, claim, now):
        """The key's slot, from this process's memory if it still holds the key."""
        slot = self._slots.get(public_key)
        if slot is None or self._q[slot * _Q_PER_SLOT] != self._hashes[public_key]:
            slot = self._slot(public_key, claim, now)
        return slot

    def _record_accepted(self, accepted, now):
        now_s = int(now)
        u32 = self._u32
        for public_key, lines in accepted.items():
            slot = self._found(public_key, True, now) if lines > 0 else None
            if slot is None:
                continue
            self._Q[slot * _Q_PER_SLOT + 1] += lines
            base = slot * _U32_PER_SLOT
            if now_s > u32[base + _LAST_ACCEPTED]:
                u32[base + _LAST_ACCEPTED] = now_s
            u32[base + _REJECTED_SINCE] = 0

    def _record_sources(self, worker, connected, came_from, now):
        """Where keys came from; this worker's bit for those it holds connections of."""
        bit = 1 << (worker % _WORKER_BITS)
        u32 = self._u32
        marked = self._marked.get(worker)
        if marked is None:  # this process's first record: a predecessor's bits go
            self._clear_bit(bit)
            marked = ()
        for public_key, (address, tls, when) in came_from.items():
            slot = self._found(public_key, True, now)
            if slot is not None:
                self._set_source(slot, address, tls, when)
        for public_key, (address, tls) in connected.items():
            slot = self._found(public_key, True, now)
            if slot is not None:
                u32[slot * _U32_PER_SLOT + _WORKERS] |= bit
                self._set_source(slot, address, tls, now)
        for public_key in marked:
            if public_key not in connected:
                slot = self._slot(public_key, False)
                if slot is not None:
                    u32[slot * _U32_PER_SLOT + _WORKERS] &= ~bit
        self._marked[worker] = set(connected)

    def _set_source(self, slot, address, tls, when):
        """Where a key's lines came from (at ``when``): the address (packed, once per
        address) and the listener, unless another worker told of a newer one."""
        # In hundredths of a second since the table was made (two connections of one
        # device a moment apart, on two workers), up to 497 days; then as recorded.
        when = min(max(0, int((when - self.created) * 100)), _MAX_COUNT)
        if when < self._u32[slot * _U32_PER_SLOT + _SOURCE_AT]:
            return
        self._u32[slot * _U32_PER_SLOT + _SOURCE_AT] = when
        view = self._bytes
        offset = slot * SLOT_SIZE
        view[offset + _LISTENER_OFFSET] = 2 if tls else 1
        packed = self._addresses.get(address, False)
        if packed is False:
            if len(self._addresses) > 100000:
                self._addresses.clear()
            packed = self._addresses[address] = _packed_address(address)
        flags = view[offset + _FLAGS_OFFSET]
        if packed is None:
            view[offset + _FLAGS_OFFSET] = flags & ~_HAS_ADDRESS
        else:
            view[offset + _ADDRESS_OFFSET:offset + _ADDRESS_OFFSET + 16] = packed
            view[offset + _FLAGS_OFFSET] = flags | _HAS_ADDRESS

    def _record_rejections(self, slot, tally, now, accepted_now):
        u32 = self._u32
        view = self._bytes
        base = slot * _U32_PER_SLOT
        offset = slot * SLOT_SIZE
        counts = tally.counts
        for reason, lines in counts.items():
            index = base + _COUNTS + _REASON_INDEX[reason]
            count = u32[index] + lines
            u32[index] = count if count < _MAX_COUNT else _MAX_COUNT
        # When recorded, as for an accepted line: an interval's summary then counts
        # each record once, whatever the second's lag of the record.
        last_s = int(max(now, tally.last_at))
        first_at = tally.last_at if tally.first_at is None else tally.first_at
        first_s = int(first_at)
        if last_s >= u32[base + _LAST_REJECTED]:
            u32[base + _LAST_REJECTED] = last_s
            view[offset + _REASON_OFFSET] = _REASON_INDEX[tally.last_reason] + 1
        flags = view[offset + _FLAGS_OFFSET]
        if tally.skew is not None and SKEW in counts:
            skew = round(tally.skew)
            self._i32[base + _SKEW_AT] = (skew if _SKEW_MIN <= skew <= _SKEW_MAX
                                          else _SKEW_MIN if skew < 0 else _SKEW_MAX)
            flags |= _HAS_SKEW
        if BAD_SIGNATURE in counts:
            flags = flags | _OLD_SECRET if tally.old_secret else flags & ~_OLD_SECRET
        view[offset + _FLAGS_OFFSET] = flags
        # When the current run of rejections began: the first rejection after the
        # last acceptance.
        last_accepted = u32[base + _LAST_ACCEPTED]
        since = u32[base + _REJECTED_SINCE]
        if accepted_now:
            # Accepted at ``now``: that wins unless a rejection came after it.
            if tally.last_at > now:
                since = int(first_at if first_at > now else tally.last_at)
            else:
                since = 0
        elif since and last_accepted <= since:
            if last_accepted <= first_s < since:  # another worker's, earlier in this run
                since = first_s
        elif int(tally.last_at) >= last_accepted:
            # In the second of the last acceptance: after it (the acceptance was
            # recorded at the end of a batch, the rejection in a later one).
            since = first_s if first_s >= last_accepted else int(tally.last_at)
        u32[base + _REJECTED_SINCE] = since

    def _clear_bit(self, bit):
        u32 = self._u32
        workers = u32[_WORKERS::_U32_PER_SLOT].tolist()
        for slot, mask in enumerate(workers):
            if mask & bit:
                u32[slot * _U32_PER_SLOT + _WORKERS] = mask & ~bit

    def clear_worker(self, worker):
        """Mark nothing connected by worker number ``worker`` (for the master, when a
        worker exits; a new worker of that number clears them at its first record too)."""
        locked = self._lock_briefly()
        try:
            self._clear_bit(1 << (worker % _WORKER_BITS))
        finally:
            if locked:
                self._unlock()

    # -- readers

    def read(self, public_key):
        """The key's :class:`DeviceState`, or None if not seen since start (or since
        forgotten)."""
        slot = self._slot(public_key, False)
        if slot is None:
            return None
        wanted = {self._hash(public_key): public_key}
        return next(self._states_in(wanted, slot, slot + 1, None, False), (None, None))[1]

    def states(self, public_keys, accepted_before=None, rejected_only=False):
        """(public key, :class:`DeviceState` or None: never seen) for each key, in no
        particular order.  Only keys with nothing accepted after ``accepted_before``
        (epoch s; never-seen keys too), only those whose lines are all rejected since
        their last acceptance (``rejected_only``): checked before a state is built.

        The table is read a column at a time and walked in slot order: a fleet's query
        costs one pass through memory, not a probe and an unpack a key."""
        key_hashes = self._hashes
        wanted = {key_hashes.get(public_key) or _key_hash(public_key): public_key
                  for public_key in public_keys}
        yield from self._states_in(wanted, 0, self.capacity, accepted_before, rejected_only)
        if not rejected_only:  # never seen (or forgotten, or claimed again during this read)
            for public_key in wanted.values():
                yield public_key, None

    def _states_in(self, wanted, first, end, accepted_before, rejected_only):
        """The states of the slots from ``first`` to ``end`` that hold a key of ``wanted``
        (hash -> public key), which loses each key found."""
        def column(view, per_slot, index):
            return view[first * per_slot + index:end * per_slot:per_slot].tolist()
        columns = [column(self._q, _Q_PER_SLOT, 0), column(self._Q, _Q_PER_SLOT, 1)]
        columns += [column(self._u32, _U32_PER_SLOT, index) for index in
                    (_LAST_ACCEPTED, _REJECTED_SINCE, _LAST_REJECTED, _WORKERS)]
        columns.append(column(self._i32, _U32_PER_SLOT, _SKEW_AT))
        columns += [column(self._bytes, SLOT_SIZE, offset)
                    for offset in (_REASON_OFFSET, _LISTENER_OFFSET, _FLAGS_OFFSET)]
        columns.append(column(self._q, _Q_PER_SLOT, 0))  # a slot claimed meanwhile is skipped
        for slot, (found, accepted, last_accepted, since, last_rejected, workers, skew, reason,
                   listener, flag, still) in enumerate(zip(*columns), first):
            public_key = wanted.get(found)
            if public_key is None or still != found:
                continue
            del wanted[found]
            if rejected_only and not since or \
                    accepted_before is not None and last_accepted > accepted_before:
                continue
            counts = self._counts(slot) if last_rejected else {}
            address = self._address(slot) if flag & _HAS_ADDRESS else None
            if self._q[slot * _Q_PER_SLOT] != found:  # forgotten while this read it
                wanted[found] = public_key
                continue
            yield public_key, DeviceState(
                public_key.decode("utf-8", "replace"), accepted,
                float(last_accepted) if last_accepted else None,
                float(last_rejected) if last_rejected else None,
                REJECTION_REASONS[reason - 1] if reason else None,
                float(since) if since else None, counts,
                skew if flag & _HAS_SKEW else None, bool(flag & _OLD_SECRET), None, address,
                _LISTENERS[listener] if listener < len(_LISTENERS) else None, workers != 0)

    def _counts(self, slot):
        base = slot * _U32_PER_SLOT + _COUNTS
        return {reason: lines for reason, lines in
                zip(REJECTION_REASONS, self._u32[base:base + len(REJECTION_REASONS)]) if lines}

    def _address(self, slot):
        offset = slot * SLOT_SIZE + _ADDRESS_OFFSET
        packed = self._memory[offset:offset + 16]
        texts = self._address_texts
        text = texts.get(packed)
        if text is None:
            if len(texts) > 100000:
                texts.clear()
            text = texts[packed] = _address_text(packed)
        return text

    def tracked(self, public_key):
        """Whether the key has a slot or would find one: False when the table is full
        for it (a reload added more keys than it was sized for)."""
        wanted = _key_hash(public_key)
        start = wanted % self.capacity
        q = self._q
        for probe in range(_PROBES):
            found = q[(start + probe) % self.capacity * _Q_PER_SLOT]
            if found == 0 or found == _TOMBSTONE or found == wanted:
                return True
        return False

    def summary(self, now, interval, silent_after):
        """(seen, silent, rejected_only) of the auth file's keys (``current``), scanning
        the table once.

        seen: keys with a line accepted in the last ``interval`` s;
        rejected_only: keys with a line rejected and none accepted in it;
        silent: keys with no line accepted for more than
        ``silent_after`` s (a key never seen is silent once the table is older
        than that).  Times are whole seconds: a line of the second the window
        begins in counts as in it.
        """
        u32 = self._u32
        hashes = self._q[::_Q_PER_SLOT].tolist()
        accepted_at = u32[_LAST_ACCEPTED::_U32_PER_SLOT].tolist()
        rejected_at = u32[_LAST_REJECTED::_U32_PER_SLOT].tolist()
        wanted = self.current
        # Only the keys of the file: a revoked key a worker still counted for is not.
        current = set(wanted)
        window = math.floor(now - interval)
        seen = rejected_only = 0
        for found, accepted, rejected in zip(hashes, accepted_at, rejected_at):
            if accepted >= window:
                seen += found in current
            elif rejected >= window:
                rejected_only += found in current
        last_accepted = dict(zip(hashes, accepted_at))
        accepted = list(map(last_accepted.get, wanted, itertools.repeat(0)))
        never = accepted.count(0)
        lately = sum(map(float(now - silent_after).__le__, accepted))
        silent = len(accepted) - never - lately
        if now - self.created > silent_after:
            silent += never
        return seen, silent, rejected_only
