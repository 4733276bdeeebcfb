"""Lines that Carbon refuses by dropping the connection: find them, set them aside.

carbon-cache has no way to refuse one line: a line it cannot decode, or one
longer than its 16,384-byte limit, makes it drop the connection, and the lines
after it in that read are lost.  The sender resends what Carbon may have lost,
so such a line would break every new connection.  When a batch breaks the
connection twice, :class:`PoisonSearch` sends it again in halves, one probe at
a time, until one line alone breaks the connection; that line goes to
:class:`DeadLetters` and everything else is delivered in order.
"""

import logging
import os

from .buffer import Chunk

log = logging.getLogger(__name__)

# How long a probe must survive to count as delivered: carbon-cache drops the
# connection as soon as it reads a line it chokes on.  At least twice as long
# as Carbon took to break the connection before the search, at most the max.
PROBE_WAIT = 0.5
MAX_PROBE_WAIT = 30.0
# After a search finds that Carbon drops even an empty connection, the next
# search waits this long (Carbon may have been restarting, not refusing).
SEARCH_COOLDOWN = 30.0

DEAD_LETTER_FILE = "dead-letters"
# A file an operator reads, not a second spool: past this size lines are only counted.
DEAD_LETTER_MAX_BYTES = 64 << 20


class DeadLetters:
    """Appends refused lines, as sent, to one file shared by the workers.

    Each line is one ``write`` on an ``O_APPEND`` descriptor, so lines from
    several workers never interleave.  Without a directory, lines are only
    counted and logged.
    """

    def __init__(self, directory):
        self.path = os.path.join(directory, DEAD_LETTER_FILE) if directory else None
        self.count = 0

    def add(self, line, carbon):
        self.count += 1
        where = "not kept (no --spool-dir)"
        if self.path is not None:
            try:
                if os.path.getsize(self.path) < DEAD_LETTER_MAX_BYTES:
                    where = self._append(line)
                else:
                    where = "not kept: %s is full" % self.path
            except FileNotFoundError:
                where = self._append(line)
            except OSError as e:
                where = "not kept: %s" % (e.strerror or e)
        log.error("Carbon drops the connection on this line; set aside, the other lines "
                  "are delivered (if every line ends here, check that the address is "
                  "Carbon's plaintext port, not its pickle port)",
                  extra={"carbon": carbon, "line": line.rstrip(b"\n"), "dead_letter": where})

    def _append(self, line):
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                os.write(fd, line if line.endswith(b"\n") else line + b"\n")
            finally:
                os.close(fd)
        except OSError as e:
            return "not kept: cannot write %s: %s" % (self.path, e.strerror or e)
        return self.path


class PoisonWatch:
    """Says when a search must start, and how long its probes wait.

    Timing cannot tell a poison line from an outage (Carbon may read late),
    but repetition can: the same resent chunk first in line at two breaks in
    a row means nothing got past it.
    """

    def __init__(self):
        self._head = None
        self._breaks = 0
        self._slowest = 0.0  # seconds from the first write to the break, in those breaks
        self._quiet_until = 0.0  # after an aborted search

    def search_wait_after_break(self, head, took, now):
        """After a break with ``head`` (a chunk's data, or None) first in line, ``took``
        seconds after the connection's first write: the probe wait of a search to start
        now, or None."""
        if head is not None and head is self._head:
            self._breaks += 1
            self._slowest = max(self._slowest, took)
        else:
            self._breaks, self._slowest = 1, took
        self._head = head
        if self._breaks >= 2 and now >= self._quiet_until:
            return min(max(PROBE_WAIT, 2 * self._slowest), MAX_PROBE_WAIT)
        return None

    def search_ended(self, aborted, now):
        self._head, self._breaks = None, 0
        if aborted:
            self._quiet_until = now + SEARCH_COOLDOWN


class PoisonSearch:
    """Halves a list of suspect chunks until one line alone breaks the connection.

    Suspects are ``(sent_at, data, line_count)`` chunks, oldest first.  The
    culprit is known to lie within the first ``span`` of them.  Each probe is
    the first half of that span: if the connection survives it for
    ``probe_wait`` seconds, those chunks were delivered; if it breaks, the
    culprit is among them.  A single chunk of several lines is split into
    lines when the span comes down to it.

    A line that breaks the connection alone is only a ``candidate``: the last
    probe is an empty connection.  If that one survives, the candidate is the
    ``culprit``; if it breaks too, Carbon (or whatever is in front of it)
    drops every connection, no line is to blame, and the search is
    ``aborted`` with every suspect kept.
    """

    def __init__(self, suspects, probe_wait):
        self.suspects = list(suspects)
        self.span = len(self.suspects)
        self.probe_wait = probe_wait
        self.probe = None  # suspects in the probe being written or awaited: None if none
        self.written_at = None
        self.candidate = None
        self.culprit = None
        self.aborted = False

    @property
    def done(self):
        return self.culprit is not None or self.aborted or (
            self.span == 0 and self.candidate is None)

    @property
    def lines(self):
        return sum(count for _, _, count in self.suspects)

    def next_probe(self):
        """The next probe, as ``(data, line_count)``: empty for the control probe."""
        self.written_at = None
        if self.candidate is not None:
            self.probe = 0
            return b"", 0
        if self.span == 1 and self.suspects[0][2] > 1:
            sent_at, data, _ = self.suspects.pop(0)
            lines = [Chunk(sent_at, line + b"\n", 1) for line in data.split(b"\n") if line]
            self.suspects[0:0] = lines
            self.span = len(lines)
        self.probe = (self.span + 1) // 2
        chunks = self.suspects[:self.probe]
        return b"".join(data for _, data, _ in chunks), sum(c for _, _, c in chunks)

    def passed(self):
        """The probe went through: return its chunks, which are delivered."""
        if self.probe == 0:  # an empty connection survives: the candidate is guilty
            self.culprit, self.candidate = self.candidate, None
            self.probe = None
            return []
        delivered = self.suspects[:self.probe]
        del self.suspects[:self.probe]
        self.span -= self.probe
        self.probe = None
        return delivered

    def failed(self):
        """The probe broke the connection: narrow the span, or name a candidate."""
        probe, self.probe = self.probe, None
        if probe == 0:  # even an empty connection breaks: not this line's fault
            self.suspects.insert(0, self.candidate)
            self.candidate = None
            self.aborted = True
        elif probe == 1 and self.suspects[0][2] == 1:
            self.candidate = self.suspects.pop(0)
            self.span = 0
        else:
            self.span = probe
