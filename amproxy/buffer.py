"""Where accepted lines wait for Carbon: a bounded memory buffer and a disk spool.

Both hold whole Carbon lines (``metric value timestamp\\n``) in chunks, oldest
first.  The spool always holds older lines than the memory buffer: when the
buffer is full its whole content is appended to the spool, so replaying the
spool and then the buffer keeps arrival order.
"""

import collections
import errno
import fcntl
import logging
import os

log = logging.getLogger(__name__)

# Chunks appended while the last one is smaller than this are merged into it.
MERGE_BYTES = 16 << 10
# A chunk of Carbon lines once sent: when it was first sent (None: never), its
# bytes, its number of lines.
Chunk = collections.namedtuple("Chunk", "sent_at data lines")


class LineBuffer:
    """A FIFO of byte chunks of whole lines, bounded in lines.

    Chunks are kept as they were batched (one per read cycle), so buffering
    costs no per-line work; small ones are merged up to MERGE_BYTES.
    """

    def __init__(self, max_lines):
        self.max_lines = max_lines
        self._chunks = collections.deque()  # (data, line_count)
        self.lines = 0
        self.bytes = 0

    def __len__(self):
        return self.lines

    def __bool__(self):
        return bool(self._chunks)

    def has_room(self, line_count=1):
        return self.lines + line_count <= self.max_lines

    def append(self, data, line_count):
        chunks = self._chunks
        if chunks and len(chunks[-1][0]) + len(data) <= MERGE_BYTES:
            # Small chunks (a fleet's one line per connection) go out together: one
            # write to Carbon for many of them, not one each.
            last, last_count = chunks.pop()
            data, line_count = last + data, last_count + line_count
            self.lines -= last_count
            self.bytes -= len(last)
        chunks.append((data, line_count))
        self.lines += line_count
        self.bytes += len(data)

    def appendleft(self, data, line_count):
        self._chunks.appendleft((data, line_count))
        self.lines += line_count
        self.bytes += len(data)

    def popleft(self):
        data, line_count = self._chunks.popleft()
        self.lines -= line_count
        self.bytes -= len(data)
        return data, line_count

    def pop_all(self):
        """Remove and return everything as one chunk, oldest first."""
        data = b"".join(chunk for chunk, _ in self._chunks)
        lines = self.lines
        self._chunks.clear()
        self.lines = self.bytes = 0
        return data, lines


class SpoolError(Exception):
    pass


SEGMENT_BYTES = 8 << 20
# Each worker's spool is <spool-dir>/worker-<slot>.
SPOOL_PREFIX = "worker-"
# How many names a worker's spool tries before it waits for its own.
SPOOL_ALTERNATES = 8
READ_BYTES = 256 << 10
_SUFFIX = ".spool"


class Spool:
    """Append-only segment files in one directory, read back sequentially.

    The directory is locked (``flock``) while a worker owns it.  At open, the
    spools of other directories beside it that nobody holds (left by a killed
    worker, or a previous run with more workers) are adopted.  A segment is
    deleted once it has been read to its end and its last lines written to
    Carbon; a worker that dies before that leaves it whole, so its successor
    sends it again (at least once, never lost).
    """

    def __init__(self, directory, max_bytes):
        self.directory = directory
        self.max_bytes = max_bytes
        self._segments = []  # sequence numbers, oldest first
        self._sizes = {}
        self._read_offset = 0  # into self._segments[0]
        self._writer = None
        self._lock_fd = None
        self.bytes = 0  # not yet read

    # -- opening -------------------------------------------------------------

    @classmethod
    def of_worker(cls, parent, slot, max_bytes):
        """Worker ``slot``'s spool under ``parent``: worker-N, or while another process
        holds that (the draining worker of the master a SIGUSR2 upgrade replaces),
        worker-N.1, worker-N.2...; what the other leaves is adopted at a later open."""
        name = os.path.join(parent, "%s%d" % (SPOOL_PREFIX, slot))
        for alternate in range(SPOOL_ALTERNATES):
            spool = cls(name + (".%d" % alternate if alternate else ""), max_bytes)
            if spool.open(wait=False) is not None:
                return spool
        return cls(name, max_bytes).open()

    def open(self, wait=True):
        """Lock and scan the directory; without ``wait``, None if another process holds it."""
        try:
            os.makedirs(self.directory, mode=0o750, exist_ok=True)
            try:
                self._lock_fd = self._lock(self.directory, blocking=wait)
            except BlockingIOError:
                return None
            for seq in self._scan(self.directory):
                self._add_segment(seq, os.path.getsize(self._path(seq)))
            self.adopt_orphans()
        except OSError as e:
            raise SpoolError("cannot use spool directory %s: %s" % (
                self.directory, e.strerror or e)) from None
        if self.bytes:
            log.warning("found spooled lines from an earlier worker; they will be sent "
                        "to Carbon", extra={"spool": self.directory, "bytes": self.bytes})
        return self

    @staticmethod
    def _lock(directory, blocking):
        fd = os.open(os.path.join(directory, "lock"), os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except OSError:
            os.close(fd)
            raise
        return fd

    @staticmethod
    def _scan(directory):
        return sorted(int(name[:-len(_SUFFIX)]) for name in os.listdir(directory)
                      if name.endswith(_SUFFIX) and name[:-len(_SUFFIX)].isdigit())

    def _path(self, seq, directory=None):
        return os.path.join(directory or self.directory, "%016d%s" % (seq, _SUFFIX))

    def _add_segment(self, seq, size):
        self._segments.append(seq)
        self._sizes[seq] = size
        self.bytes += size

    def _next_seq(self):
        return self._segments[-1] + 1 if self._segments else 1

    def adopt_orphans(self):
        """Take the segments of the spools beside this one that nobody holds; the bytes
        taken.  At open, and now and then after: a worker of the master an upgrade
        replaced may spool what it holds as it stops, after this one opened."""
        adopted = 0
        parent = os.path.dirname(os.path.abspath(self.directory))
        mine = os.path.basename(os.path.abspath(self.directory))
        for name in sorted(os.listdir(parent)):
            other = os.path.join(parent, name)
            if name == mine or not name.startswith(SPOOL_PREFIX) or not os.path.isdir(other):
                continue
            try:
                fd = self._lock(other, blocking=False)
            except OSError as e:
                if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
                    continue  # a live worker owns it
                raise
            try:
                for seq in self._scan(other):
                    if self._writer is not None:  # what comes next goes after these
                        self._writer.close()
                        self._writer = None
                    new = self._next_seq()
                    os.rename(self._path(seq, other), self._path(new))
                    self._add_segment(new, os.path.getsize(self._path(new)))
                    adopted += self._sizes[new]
            finally:
                os.close(fd)
        return adopted

    # -- writing ---------------------------------------------------------------

    def has_room(self, nbytes):
        return self.bytes + nbytes <= self.max_bytes

    def append(self, data):
        """Append whole lines; raise SpoolError if the disk refuses them."""
        try:
            if self._writer is None or self._sizes[self._segments[-1]] >= SEGMENT_BYTES:
                self._start_segment()
            self._writer.write(data)
            self._writer.flush()
        except OSError as e:
            raise SpoolError("cannot write to spool %s: %s" % (
                self.directory, e.strerror or e)) from None
        self._sizes[self._segments[-1]] += len(data)
        self.bytes += len(data)

    def _start_segment(self):
        if self._writer is not None:
            self._writer.close()
        seq = self._next_seq()
        # 0640, as the dead letters: spooled lines are the devices' data.
        self._writer = os.fdopen(os.open(self._path(seq), os.O_WRONLY | os.O_APPEND |
                                         os.O_CREAT, 0o640), "ab")
        self._add_segment(seq, 0)

    def sync(self):
        if self._writer is not None:
            self._writer.flush()
            os.fsync(self._writer.fileno())

    # -- reading ---------------------------------------------------------------

    def __bool__(self):
        return self.bytes > 0

    def read_chunk(self, limit=READ_BYTES):
        """The next whole lines, up to ``limit`` bytes, and their count; None if empty.

        A segment read to its end stays on disk until ``release_read``, so a
        worker killed before it sent the last chunk leaves it to its successor.
        """
        while self._segments:
            seq = self._segments[0]
            size = self._sizes[seq]
            if self._read_offset >= size:
                self._drop_first_segment()
                continue
            try:
                with open(self._path(seq), "rb") as f:
                    f.seek(self._read_offset)
                    data = f.read(min(limit, size - self._read_offset))
            except FileNotFoundError:
                # Deleted behind our back: its lines are gone, the rest must go on.
                log.error("spool segment %s was deleted; %d bytes of lines in it are lost",
                          self._path(seq), size - self._read_offset)
                self._drop_first_segment()
                continue
            except OSError as e:  # out of descriptors, say: the segment stays, try later
                raise SpoolError("cannot read spool segment %s: %s" % (
                    self._path(seq), e.strerror or e)) from None
            # Lines are far shorter than ``limit``; no newline at all means a
            # torn write, which goes out as it is and Carbon drops.
            end = data.rfind(b"\n") + 1 or len(data)
            data = data[:end]
            self._read_offset += end
            self.bytes -= end
            return data, data.count(b"\n") or 1
        return None

    def release_read(self):
        """Everything read so far is safe elsewhere: delete a segment read to its end."""
        if self._segments and self._read_offset >= self._sizes[self._segments[0]]:
            self._drop_first_segment()

    def _drop_first_segment(self):
        seq = self._segments.pop(0)
        self.bytes -= self._sizes.pop(seq) - self._read_offset
        self._read_offset = 0
        if self._writer is not None and not self._segments:
            self._writer.close()  # it was writing the segment just read
            self._writer = None
        try:
            os.unlink(self._path(seq))
        except FileNotFoundError:
            pass

    def close(self):
        if self._writer is not None:
            self.sync()
            self._writer.close()
            self._writer = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
