"""The auth file as a read-only snapshot that the master and every worker map.

Parsed into Python objects in every worker, a fleet's auth file would be in
memory once per worker after a reload (a forked worker copies everything it
builds).  Instead, as Postfix's postmap does for its tables, the master compiles the file into one indexed snapshot
(a sealed memfd: the file's text in the standard layout, see
:mod:`amproxy.authscan`, and a hash table of the keys' offsets), and hands
it to the workers over a socket.  Each process maps the same pages, so the
snapshot is in memory once however many workers there are, and a reload is
a swap of one reference.  A worker builds a key's :class:`AuthKey` the first
time a line names it (:class:`KeyCache`).

The master compiles in a child process: a file in another layout goes
through the YAML parser there, whose hundreds of MB go when the child exits.
A snapshot is built and checked completely before anyone uses it, so a
broken file never takes keys away from running devices.
"""

import fcntl
import json
import logging
import mmap
import os
import re
import select
import signal
import time
from array import array
from zlib import crc32

from .auth import AuthKey, KeyMap, split_patterns, parse_auth_file, parse_rfc3339, \
    read_auth_file, warn_if_world_readable
from .authscan import GLOB_BYTES, Layout, block_regex, entry_block, scan
from .errors import AuthFileError
from .links import NOT_FOR_A_CHILD, Update, fork_plain_child

log = logging.getLogger(__name__)

HEADER_SIZE = 4096
FORMAT = 1
# Keys a worker keeps built (HMAC states, metric set: about 3.5 KB each with 10
# metrics); past this it starts over, so a worker that has seen every key of a
# fleet holds at most about 70 MB of them.  Building one again costs ~20 us.
MAX_CACHED_KEYS = 20000
# A file of more keys than this outside the standard layout is worth a warning:
# YAML reads it slowly (about 20 s and 900 MB for 100,000 keys).
SLOW_LAYOUT_WARNING_KEYS = 1000
SLOW_LAYOUT = ("auth file %s is not in the standard layout (see the README), so each "
               "reload of its %d keys goes through the slow YAML parser")
# A changed file is taken once it has stayed the same this long (a poll sees it).
SETTLE_SECONDS = 1.0
# How long the master waits for the child compiling a snapshot.
COMPILE_TIMEOUT = 120.0

_SEALS = (fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE)
# In a snapshot written from YAML, a byte a value cannot hold is written \xx
# (a quote, too: a quoted item is unquoted when read).
_NEEDS_ESCAPE = re.compile(rb"[\s\\:']")
_ESCAPED = re.compile(rb"\\([0-9a-f]{2})")


def _escape(value):
    if not _NEEDS_ESCAPE.search(value):
        return value
    return _NEEDS_ESCAPE.sub(lambda m: b"\\%02x" % m.group()[0], value)


def _unescape(value):
    return _ESCAPED.sub(lambda m: bytes([int(m.group(1), 16)]), value)


# -- compiling (in a child of the master) -------------------------------------------


def write_snapshot(path, fd):
    """Read and check the auth file at ``path``; write its snapshot to ``fd``."""
    raw = read_auth_file(path)
    found = scan(raw, path)
    if found is not None:
        text, layout, offsets, hashes = raw, found.layout, found.offsets, found.hashes
        counts = (len(found), found.metric_count, found.pattern_count, found.rate_limited,
                  found.rate_total)
        warnings = found.warnings
    else:
        db = parse_auth_file(raw, path)
        del raw
        counts = len(db), db.metric_count, db.pattern_count, db.rate_limited, db.rate_total
        text, layout, offsets, hashes = _standard_layout_of(db)
        warnings = db.warnings
    for warning in warnings:  # at each load: the file still loads
        log.warning("%s", warning)
    size = 1
    while size < 2 * len(offsets):
        size *= 2
    slots = array("Q", bytes(8 * size))
    mask = size - 1
    for offset, name_hash in zip(offsets, hashes):
        i = name_hash & mask
        while slots[i]:
            i = (i + 1) & mask
        slots[i] = offset + 1  # 0: an empty slot
    fields = {
        "format": FORMAT, "standard": found is not None, "keys": counts[0], "metrics": counts[1], "patterns": counts[2],
        "rate_limited": counts[3], "rate_total": counts[4], "key_indent": layout.key_indent.decode(),
        "field_indent": layout.field_indent.decode(),
        "item_prefix": layout.item_prefix.decode(), "slots": size}
    # The header is one line of JSON, padded to whole pages (room left for two fields).
    pages = (len(json.dumps(fields)) + 64) // HEADER_SIZE + 1
    text_at = pages * HEADER_SIZE
    fields.update(text_at=text_at, slots_at=text_at + len(text) + (-len(text) % 8))
    header = json.dumps(fields).encode() + b"\n"
    with open(fd, "wb", closefd=False) as out:
        out.write(header.ljust(text_at))
        out.write(text)
        out.write(bytes(fields["slots_at"] - text_at - len(text)))
        out.write(slots)


def _standard_layout_of(db):
    """A file in another layout, written out in the standard one (values escaped)."""
    layout = Layout(b"  ", b"    ", b"    - ")
    chunks, offsets, hashes = [], array("Q"), array("L")
    position = 0
    for public_key, key in db.keys.items():
        name = _escape(public_key)
        secret, metrics, previous, until, max_rate = key.entry()
        block = entry_block(layout, name, _escape(secret.encode()),
                            [_escape(metric.encode()) for metric in metrics],
                            previous and (_escape(previous.encode()), b"%r" % until),
                            b"%r" % max_rate if max_rate else None)
        offsets.append(position)
        hashes.append(crc32(name))
        chunks.append(block)
        position += len(block)
    return b"".join(chunks), layout, offsets, hashes


class Compilation:
    """A snapshot being built by a child process.

    The master's loop watches it (``fileno``) and calls ``read`` when it is
    readable, so supervision and signals go on while a large file is read.
    """

    def __init__(self, path, reason):
        self.path = path
        self.reason = reason
        self.deadline = time.monotonic() + COMPILE_TIMEOUT
        self.status = None  # the child's wait status, once reaped
        self._chunks = []
        self._read_end = None
        try:
            self.fd = os.memfd_create("amproxy-auth", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except OSError as e:
            raise AuthFileError("auth file %s: no memory to load it into: %s" % (
                path, e.strerror or e)) from None
        try:
            read_end, write_end = os.pipe()
            self.pid = fork_plain_child(ignore=NOT_FOR_A_CHILD)
        except OSError as e:
            os.close(self.fd)
            raise AuthFileError("auth file %s could not be read: no process for it: %s" % (
                path, e.strerror or e)) from None
        if self.pid == 0:
            _compile_in_child(path, self.fd, read_end, write_end)  # never returns
        os.close(write_end)
        os.set_blocking(read_end, False)
        self._read_end = read_end

    def fileno(self):
        return self._read_end

    def read(self):
        """Take what the child wrote; True once it is done (it closed the pipe)."""
        try:
            chunk = os.read(self._read_end, 65536)
        except (BlockingIOError, InterruptedError):
            return False
        self._chunks.append(chunk)
        return not chunk

    def overdue(self, now):
        return now >= self.deadline

    def reaped(self, pid, status):
        """The master reaped a child: whether it was this one (its status is kept)."""
        if pid != self.pid:
            return False
        self.status = status
        return True

    def kill(self):
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._chunks = [("auth file %s took over %d s to read" % (
            self.path, COMPILE_TIMEOUT)).encode("utf-8", "replace")]

    def result(self):
        """The :class:`Update`: the sealed snapshot, or why there is none."""
        os.close(self._read_end)
        if self.status is None:
            try:
                _, self.status = os.waitpid(self.pid, 0)  # it is exiting: it closed the pipe
            except ChildProcessError:
                self.status = 0x100  # reaped elsewhere: not known to have succeeded
        message = b"".join(self._chunks).decode("utf-8", "replace")
        code = os.waitstatus_to_exitcode(self.status)
        if code == 0 and not message:
            try:
                fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, _SEALS)
                return Update(self.reason, fd=self.fd)
            except OSError as e:
                message = "auth file %s: its snapshot could not be sealed: %s" % (
                    self.path, e.strerror or e)
        os.close(self.fd)
        if message:
            return Update(self.reason, error=message)
        # Killed (out of memory, say) before it could judge the file: try it again.
        return Update(self.reason, error="auth file %s: the process reading it failed "
                      "(status %d)" % (self.path, code), retry=True)


def _compile_in_child(path, fd, read_end, write_end):
    """In the child: write the snapshot, or the reason the file is refused; exit."""
    status = 1
    try:
        os.close(read_end)
        write_snapshot(path, fd)
        status = 0
    except AuthFileError as e:
        os.write(write_end, str(e).encode("utf-8", "replace"))
    except BaseException as e:  # its text might quote the file: the type only
        os.write(write_end, ("auth file %s could not be read (%s)" % (
            path, type(e).__name__)).encode("utf-8", "replace"))
    os._exit(status)


def compile_snapshot(path, reason="start"):
    """Compile and wait: the :class:`Update` (for the start, and tests)."""
    try:
        compilation = Compilation(path, reason)
    except AuthFileError as e:
        return Update(reason, error=str(e), retry=True)
    while not compilation.read():
        now = time.monotonic()
        if compilation.overdue(now):
            compilation.kill()
            break
        select.select([compilation], [], [], compilation.deadline - now)
    return compilation.result()


# -- reading (in every process) ------------------------------------------------------


class KeyCache(KeyMap):
    """Public key -> AuthKey, built from the snapshot the first time a line names it."""

    __slots__ = ("_find", "_has", "_dropped_counts")

    def __init__(self, find, has):
        super().__init__()
        self._find = find
        self._has = has
        self._dropped_counts = {}  # what key objects dropped from the cache had counted

    def __missing__(self, public_key):
        key = self._find(public_key)
        if key is not None:
            if len(self) >= MAX_CACHED_KEYS:
                self._dropped_counts = self.take_counts()
                self.clear()
            self[public_key] = key
        return key

    def take_counts(self):
        counts, self._dropped_counts = self._dropped_counts, {}
        for public_key, count in super().take_counts().items():
            counts[public_key] = counts.get(public_key, 0) + count
        return counts

    def __contains__(self, public_key):
        # A probe, not a key object: a worker's record asks of each connection's key,
        # and 50,000 of them built and dropped the cache's keys every second.
        return dict.__contains__(self, public_key) or self._has(public_key)


class AuthSnapshot:
    """One version of the auth file, mapped read-only: the lookup the hot path uses."""

    def __init__(self, fd):
        index = SnapshotIndex(fd)
        self.count = index.header["keys"]
        self.metric_count = index.header["metrics"]
        self.pattern_count = index.header["patterns"]
        self.rate_limited = index.header["rate_limited"]
        self.rate_total = index.header["rate_total"]
        self.standard = index.header["standard"]  # read in place, not by YAML
        # The cache refers to the index and not to this object: dropping the
        # snapshot unmaps it at once, with no cycle left for the GC to find.
        self.keys = KeyCache(index.find, index.has)
        self._index = index

    def __len__(self):
        return self.count

    def get(self, public_key, default=None):
        key = self.keys[public_key]
        return default if key is None else key

    def names(self):
        """Every public key (bytes), in no particular order."""
        return self._index.names()


class SnapshotIndex:
    """The mapped snapshot's hash table: a key's entry by its public key."""

    def __init__(self, fd):
        self._map = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
        self.header = header = json.loads(self._map[:self._map.find(b"\n")])
        if header.get("format") != FORMAT:
            raise ValueError("not an auth snapshot of format %d" % FORMAT)
        layout = [header[k].encode() for k in ("key_indent", "field_indent", "item_prefix")]
        self._layout = Layout(*layout)
        # Only a snapshot written from YAML holds escapes; one that is the file's own
        # text holds each value as the file does (a backslash there is a backslash).
        self._escaped = not header["standard"]
        self._block = block_regex(*layout, rb"[^\s:]+", rb"\S+", rb"\S+", rb"\S+").match
        start = header["slots_at"]
        self._slots = memoryview(self._map)[start:start + 8 * header["slots"]].cast("Q")
        self._mask = header["slots"] - 1
        self._text_at = header["text_at"] - 1  # slots hold offset + 1
        self._patterns = {}  # compiled matchers, shared by keys with the same patterns

    def names(self):
        skip = len(self._layout.key_indent)
        text = self._map
        for offset in self._slots:
            if offset:
                start = offset + self._text_at + skip
                name = text[start:text.find(b":\n", start)]
                yield _unescape(name) if self._escaped else name

    def find(self, public_key):
        """The :class:`AuthKey` of ``public_key``, built from its entry; None if absent."""
        offset = self._entry(public_key)
        return None if offset is None else self._key_at(offset)

    def has(self, public_key):
        return self._entry(public_key) is not None

    def _entry(self, public_key):
        """Where the key's entry starts in the text; None if it has none."""
        if not public_key:  # None: a line rejected before it named a key
            return None
        name = _escape(public_key) if self._escaped else public_key
        line = name + b":\n"
        skip = len(self._layout.key_indent)
        i = crc32(name) & self._mask
        while True:
            offset = self._slots[i]
            if not offset:
                return None
            offset += self._text_at
            if self._map[offset + skip:offset + skip + len(line)] == line:
                return offset
            i = (i + 1) & self._mask

    def _key_at(self, offset):
        m = self._block(self._map, offset)
        name, secret, previous, expires, rate, items = m.group(2, 3, 4, 5, 6, 7)
        metrics = self._layout.metric_names(items)
        if self._escaped and b"\\" in m.group(1):  # written from YAML, with escapes
            name, secret = _unescape(name), _unescape(secret)
            previous = previous and _unescape(previous)
            metrics = [_unescape(metric) for metric in metrics]
        name = name.decode()
        metrics = [metric.decode() for metric in metrics]
        if len(self._patterns) > MAX_CACHED_KEYS:
            self._patterns.clear()
        exact, patterns, matcher = (
            split_patterns(metrics, name, "", self._patterns) if items and GLOB_BYTES.search(items)
            else (metrics, (), None))
        until = 0
        if previous:
            previous = previous.decode()
            try:
                until = float(expires)
            except ValueError:  # as written in the file
                until = parse_rfc3339(expires.decode())
        return AuthKey(name, secret.decode(), exact, patterns, matcher, previous or None,
                       until, float(rate) if rate else 0.0)


# -- from the master to the workers ---------------------------------------------------


class AuthFile:
    """The current snapshot (``db``) of one auth file.

    The master compiles it (``load``; ``start_compile`` and ``finish``, or
    ``compile``) and sends each update to the workers, which ``take`` it.  In
    a single process, ``reload`` does both.
    """

    def __init__(self, path):
        self.path = path
        self._identity = None
        self._seen = None  # a change the poll saw: (identity, since when)
        self.db = None
        self.reloads = 0
        self.reload_errors = 0

    def load(self):
        """First load: an error here is fatal, so it propagates.  What may surprise
        an operator is said once, here."""
        update = self.compile("start")
        if update.error is not None:
            raise AuthFileError(update.error)
        self.take(update, quiet=True)
        warn_if_world_readable(self.path)
        if not len(self.db):
            log.warning("auth file %s has no keys; every line is rejected until one is added "
                        "(amproxy keys new NAME --metric PATTERN)", self.path)
        if not self.db.standard and len(self.db) >= SLOW_LAYOUT_WARNING_KEYS:
            log.warning(SLOW_LAYOUT, self.path, len(self.db))
        return self.db

    def _current_identity(self):
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        # What changes when the file is rewritten in place or replaced by a rename.
        return (st.st_ino, st.st_dev, st.st_mtime_ns, st.st_size)

    def changed(self):
        return self._current_identity() != self._identity

    def settled_change(self, now):
        """Whether to read the file again: it changed, and has not changed for
        SETTLE_SECONDS since (by its mtime, or as seen here), so that a file still
        being written is not taken half-written, whether in place or to a new inode
        (``install``, ``rm; gen >``): a rename cannot be told from those."""
        identity = self._current_identity()
        if identity == self._identity:
            self._seen = None
            return False
        if identity is None:
            return True  # gone: the read says so, once
        if self._seen is None or self._seen[0] != identity:
            self._seen = (identity, now)  # changed (again): wait until it holds still
        return (now - self._seen[1] >= SETTLE_SECONDS
                or time.time() - identity[2] / 1e9 >= SETTLE_SECONDS)

    @property
    def settling(self):
        """A change was seen and is waiting to hold still."""
        return self._seen is not None

    def start_compile(self, reason):
        """A :class:`Compilation` of the file as it is now; AuthFileError if none starts."""
        self._identity = self._current_identity()
        try:
            return Compilation(self.path, reason)
        except AuthFileError:
            self._identity = None  # look again at the next check
            raise

    def finish(self, compilation):
        return self._judged(compilation.result())

    def compile(self, reason):
        """An :class:`Update` with the file as it is now, or why it was refused (waits)."""
        self._identity = self._current_identity()
        return self._judged(compile_snapshot(self.path, reason))

    def _judged(self, update):
        if update.retry:
            self._identity = None  # the file was not judged: look again at the next check
        return update

    def take(self, update, quiet=False):
        """Switch to the update's snapshot; else keep the keys in use.  Closes its fd."""
        try:
            if update.error is None:
                db = AuthSnapshot(update.fd)
        except (OSError, ValueError) as e:
            update.error = "the new auth file could not be mapped: %s" % e
        finally:
            update.close()
        if update.error is not None:
            if not quiet:
                self.reload_errors += 1
                log.error("%s; keeping the %d keys loaded before", update.error, len(self.db),
                          extra={"file": self.path})
            return False
        self.db = db
        if not quiet:
            self.reloads += 1
            log.info("auth file reloaded", extra={"file": self.path, "keys": len(db),
                                                  "reason": update.reason})
        return True

    def reload(self, reason):
        return self.take(self.compile(reason))

    def reload_if_changed(self):
        return self.changed() and self.reload("file changed")


class AuthReloads:
    """The master's side: one compile at a time, in a child, while its loop goes on.

    A compile is asked for on SIGHUP (``request``) or when the file changed
    (``check_file``).  A request made during a compile runs once after it.  Each result goes to
    every worker (``channels()``: their :class:`SnapshotChannel`), and the
    master keeps it for the workers it starts later.
    """

    def __init__(self, auth_file, channels, taken=None):
        """``taken(db)``: called with each new version the master takes."""
        self.auth_file = auth_file
        self._channels = channels
        self._taken = taken
        self._compiling = None
        self._queued = None
        self._next_check = 0.0

    def check_file(self, interval):
        """The mtime poll, every ``interval`` seconds (--auth-reload-interval)."""
        now = time.monotonic()
        if now >= self._next_check:
            if self.auth_file.settled_change(now):
                self.request("file changed")
            # While a change settles, look often: it is taken a second after its end.
            self._next_check = now + (0.1 if self.auth_file.settling else max(interval, 0.1))

    def request(self, reason):
        if self._compiling is not None:
            self._queued = reason
            return
        try:
            self._compiling = self.auth_file.start_compile(reason)
        except AuthFileError as e:
            self._publish(Update(reason, error=str(e)))

    def readable(self):
        return [] if self._compiling is None else [self._compiling]

    def timeout(self, timeout):
        """``timeout``, or less to be back in time for the next check or a late compile."""
        wake = self._next_check
        if self._compiling is not None:
            wake = min(wake, self._compiling.deadline)
        return max(0.0, min(timeout, wake - time.monotonic()))

    def on_ready(self, ready):
        compiling = self._compiling
        if compiling is None:
            return
        if compiling in ready:
            if not compiling.read():
                return
        elif compiling.overdue(time.monotonic()):
            compiling.kill()
        else:
            return
        self._compiling = None
        self._publish(self.auth_file.finish(compiling))
        if self._queued is not None:
            reason, self._queued = self._queued, None
            self.request(reason)

    def reaped(self, pid, status):
        return self._compiling is not None and self._compiling.reaped(pid, status)

    def stop(self):
        self._next_check = float("inf")  # stopping: no more checks to wake up for
        if self._compiling is not None:
            self._compiling.kill()
            self._compiling.result().close()
            self._compiling = None

    def _publish(self, update):
        for channel in self._channels():
            channel.send(update)
        if self.auth_file.take(update, quiet=True) and self._taken is not None:
            self._taken(self.auth_file.db)
