"""The per-worker connection to Carbon: non-blocking, buffered, lossless.

The worker's read cycle hands over one chunk of Carbon lines; the sender
writes as much as the socket takes and keeps the rest, so a slow or absent
Carbon never blocks the reading of clients.

Where lines wait, oldest first: the disk spool, then the memory buffer.  When
the buffer is full it is appended to the spool; when the spool is full too
(or there is none) the sender says so with ``full`` and the worker stops
reading its clients, so TCP holds the data on the devices.  No line is
dropped while the worker runs.

Carbon acknowledges nothing, and carbon-cache loses the points it holds in
memory when it dies.  So lines sent in the last ``resend_window`` seconds are
kept, and sent again after the connection breaks: delivery is at least once.
A resent line keeps the time it was first sent, so it leaves the window.

A connection counts as healthy once it has stayed up ``PROBATION`` seconds;
only then does the reconnect backoff start again from its shortest delay.
When the connection breaks twice with the same resent lines first in line,
one of them may be poison to Carbon: see :mod:`amproxy.deadletter`.
"""

import collections
import errno
import logging
import selectors
import socket

from .buffer import Chunk, LineBuffer, SpoolError
from .deadletter import SEARCH_COOLDOWN, DeadLetters, PoisonSearch, PoisonWatch
from .placement import Destination

log = logging.getLogger(__name__)

INITIAL_BACKOFF = 0.1
MAX_BACKOFF = 10.0
# A connection counts as healthy (what it carried as sent) once it has stayed up this long.
PROBATION = 1.0
# After back-pressure, reading resumes only below this share of the buffer (as
# carbon's QUEUE_LOW_WATERMARK_PCT), so that an overload does not flap.
RESUME_FILL = 0.8
# Carbon never writes to us; reading only tells us that it closed the connection.
_DRAIN_SIZE = 4096


class Backlog:
    """Lines not yet sent, oldest first: the spool (on disk, if any), then the memory
    buffer.  A full buffer is appended to the spool whole (``spill``), so that taking
    from the spool first keeps arrival order."""

    def __init__(self, buffer_lines, spool=None):
        self.buffer = LineBuffer(buffer_lines)
        self.spool = spool
        self.spilling = False  # since the last time the backlog was delivered
        self._spool_unreadable = False

    def __bool__(self):
        return bool(self.spool) or bool(self.buffer)

    def spill(self):
        """Move the memory buffer to the end of the spool, if it fits."""
        if self.spool is None or not self.spool.has_room(self.buffer.bytes):
            return
        data, lines = self.buffer.pop_all()
        try:
            self.spool.append(data)
        except SpoolError as e:
            log.error(str(e))
            self.buffer.append(data, lines)
            return
        if not self.spilling:
            self.spilling = True
            log.warning("memory buffer full; spilling lines to the spool", extra={
                "spool": self.spool.directory, "buffer_lines": self.buffer.max_lines})

    def take(self):
        """The next chunk to send, (data, line_count), or None."""
        chunk = self._read_spool() if self.spool else None
        if chunk is None and self.buffer:  # the spool cannot be read now: memory goes first
            chunk = self.buffer.popleft()
        return chunk

    def _read_spool(self):
        """The spool's next chunk; None (logged once) while it cannot be read."""
        try:
            chunk = self.spool.read_chunk()
        except SpoolError as e:
            if not self._spool_unreadable:
                self._spool_unreadable = True
                log.error("%s; sending from memory meanwhile", e)
            return None
        self._spool_unreadable = False
        return chunk

    def adopt_orphans(self):
        """The bytes of spools other workers left (see ``Spool.adopt_orphans``), now ours."""
        if self.spool is None:
            return 0
        try:
            adopted = self.spool.adopt_orphans()
        except OSError as e:
            log.warning("cannot look for spools other workers left: %s", e.strerror or e,
                        extra={"spool": self.spool.directory})
            return 0
        if adopted:
            log.warning("found lines another worker spooled as it stopped; they will be "
                        "sent to Carbon", extra={"spool": self.spool.directory,
                                                 "bytes": adopted})
        return adopted

    def sent(self):
        """What was taken from the spool is delivered."""
        if self.spool is not None:
            self.spool.release_read()

    def save(self, held):
        """On the way out: ``held`` chunks first, then the buffer, into the spool; the
        number of lines that could not be kept (no spool, or it failed)."""
        for _, data, line_count in reversed(held):
            self.buffer.appendleft(data, line_count)
        data, lines = self.buffer.pop_all()
        if self.spool is not None:
            try:
                if lines:
                    self.spool.append(data)
                    self.spool.sync()
                # What was read from the oldest segment is now sent or saved again.
                self.spool.release_read()
                return 0
            except SpoolError as e:
                log.error(str(e))
        return lines


class ResendWindow:
    """What Carbon may still lose (it acknowledges nothing): the chunks sent in the last
    ``window`` seconds (``recent``, at most ``max_lines`` lines), those sent on a
    connection not yet proved healthy (``unconfirmed``, never taken as delivered,
    however old), and after a break, those to send again first (``resend``)."""

    def __init__(self, window, max_lines, clock):
        self.window = window
        self.max_lines = max_lines
        self.clock = clock
        self.recent = collections.deque()
        self.recent_lines = 0
        self.unconfirmed = []
        self.unconfirmed_lines = 0  # checked at every write, so kept, not summed
        self.resend = collections.deque()  # goes first
        self._cut_logged = False

    def add(self, chunks, healthy):
        """Keep sent chunks for the window (their first send time counts)."""
        if not self.window:
            return
        if not healthy:
            self.unconfirmed.extend(chunks)
            self.unconfirmed_lines += sum(chunk.lines for chunk in chunks)
            return
        now = self.clock()
        for chunk in chunks:
            self.recent.append(chunk)
            self.recent_lines += chunk.lines
        horizon = now - self.window
        recent = self.recent
        # Kept sent lines are bounded by --buffer-size too, oldest go first.
        while recent and (recent[0].sent_at < horizon or self.recent_lines > self.max_lines):
            chunk = recent.popleft()
            self.recent_lines -= chunk.lines
            if chunk.sent_at >= horizon and not self._cut_logged:
                self._cut_logged = True
                log.warning("--buffer-size cannot hold --resend-window of sent lines; "
                            "a Carbon crash may lose the older ones", extra={
                                "buffer_lines": self.max_lines, "resend_window": self.window,
                                "kept_seconds": round(now - chunk.sent_at, 2)})

    def confirm(self):
        """The connection proved healthy: what it carried joins the window."""
        unconfirmed, self.unconfirmed = self.unconfirmed, []
        self.unconfirmed_lines = 0
        self.add(unconfirmed, True)

    def requeue(self):
        """After a break: what Carbon may have lost goes to ``resend``, in order; its lines."""
        horizon = self.clock() - self.window
        recent = [chunk for chunk in self.recent if chunk.sent_at >= horizon] + self.unconfirmed
        self.resend.extendleft(reversed(recent))
        self.recent.clear()
        self.recent_lines = 0
        self.unconfirmed = []
        self.unconfirmed_lines = 0
        return sum(chunk.lines for chunk in recent)

    def forget_held(self):
        """On the way out, once the chunks not known delivered are saved elsewhere."""
        self.unconfirmed = []
        self.unconfirmed_lines = 0
        self.resend.clear()

    @property
    def empty(self):
        return not self.resend and not self.unconfirmed


class CarbonSender:
    def __init__(self, address, selector, clock, buffer_lines, spool=None,
                 replay_rate=0, resend_window=0.0, dead_letters=None):
        self.address = Destination(*address)  # (host, port) will do
        self.selector = selector
        self.clock = clock
        self.backlog = Backlog(buffer_lines, spool)
        self.buffer, self.spool = self.backlog.buffer, self.backlog.spool
        self.dead_letters = dead_letters or DeadLetters(None)
        self.replay_rate = replay_rate
        self.carbon = CarbonConnection(self.address, selector, clock, self)
        self._first_write_at = None  # on this connection
        self._healthy = False  # up for PROBATION seconds
        self._poison_watch = PoisonWatch()
        self._current = None  # (data, line_count) being written
        self._current_sent_at = None  # when a resent chunk was first sent
        self._offset = 0
        self.window = ResendWindow(resend_window, buffer_lines, clock)
        self._search = None  # a PoisonSearch while one runs
        self._replaying = False  # sending a backlog: the replay rate applies
        self._tokens = 0.0
        self._tokens_at = 0.0
        self.full = False
        self.reconnects = 0
        self.dropped_lines = 0
        self.lines_sent = 0  # written to the socket, resent lines again

    # -- the worker's side -------------------------------------------------

    def _held_for_resend(self):
        """Chunks to send before the queue: a search's suspects, then resent ones."""
        held = list(self.window.unconfirmed)
        if self._search is not None:
            if self._search.candidate is not None:
                held.append(self._search.candidate)
            held.extend(self._search.suspects)
        return held + list(self.window.resend)

    @property
    def queued_lines(self):
        """Lines in memory, waiting or being written (the spool is not counted)."""
        held = sum(count for _, _, count in self._held_for_resend())
        return self.buffer.lines + held + (self._current[1] if self._current else 0)

    @property
    def spooled_bytes(self):
        return self.spool.bytes if self.spool is not None else 0

    @property
    def memory_empty(self):
        return (not self.buffer and self._current is None and self.window.empty
                and self._search is None)

    def enqueue(self, data, line_count):
        """Queue a chunk of Carbon lines.  Never drops: may set ``full``."""
        self.buffer.append(data, line_count)
        if not self.buffer.has_room(0):
            self.backlog.spill()
            self.full = not self.buffer.has_room()

    def flush(self):
        """Write what the socket takes now; connect first if it is time to."""
        if self.carbon.connected:
            self._write()
        elif self.carbon.due(self.clock()):
            self.carbon.connect()
        if self.full:
            self.backlog.spill()  # the spool may have room again
            self.full = self.buffer.lines > self.buffer.max_lines * RESUME_FILL

    def _write(self):
        now = self.clock()
        if not self._healthy and now - self.carbon.connected_at >= PROBATION:
            self._healthy = True
            self.carbon.healthy()
            self.window.confirm()
        search = self._search
        if search is not None and search.written_at is not None and \
                now - search.written_at >= search.probe_wait:
            self.window.add(search.passed(), self._healthy)
            if search.done:
                self._end_search()
        try:
            while self._next_chunk():
                if self._first_write_at is None:
                    self._first_write_at = now
                data, line_count = self._current
                sent = self.carbon.sock.send(memoryview(data)[self._offset:])
                self._offset += sent
                if self._offset < len(data):
                    break
                self._sent(data, line_count)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as e:
            self.lost(e.strerror or str(e))
            return
        waiting = self._current is not None
        self.carbon.watch(selectors.EVENT_READ | (selectors.EVENT_WRITE if waiting else 0))

    def _next_chunk(self):
        """Make sure ``_current`` holds the next chunk to write; False if none may go now."""
        if self._current is not None:
            return True
        self._current_sent_at = None
        if self._search is not None:
            if self._search.probe is not None:
                return False  # one probe at a time: wait for its verdict
            self._current = self._search.next_probe()
            self._offset = 0
            return True
        if self.window.resend:
            self._current_sent_at, data, line_count = self.window.resend.popleft()
            self._current = (data, line_count)
            self._offset = 0
            return True
        if not self._healthy and self.window.unconfirmed_lines >= self.buffer.max_lines:
            # The rest waits until this connection has stayed up: a front that
            # accepts and drops would otherwise pull the whole spool into memory.
            return False
        if not self.backlog:
            # Checked before the rate limit: an empty backlog with no tokens left
            # would otherwise never be declared delivered.  A connection that
            # has not proved healthy may still break and take it back.
            if self._replaying and self._healthy:
                self._replaying = False
                self.backlog.spilling = False
                log.info("backlog delivered to Carbon", extra={"carbon": self._where()})
            return False
        if self._replaying and self.replay_rate and not self._take_tokens():
            return False
        self._current = self.backlog.take()
        if self._current is None:
            return False
        self._offset = 0
        if self._replaying and self.replay_rate:
            self._tokens -= self._current[1]
        return True

    def _take_tokens(self):
        now = self.clock()
        self._tokens = min(self._tokens + (now - self._tokens_at) * self.replay_rate,
                           float(self.replay_rate))
        self._tokens_at = now
        return self._tokens > 0

    def seconds_to_next_write(self, now):
        """How long the worker may sleep before ``flush`` has work it cannot get by event."""
        if self.carbon.sock is None:
            return self.carbon.seconds_to_attempt(now)
        if self.carbon.connected and not self._healthy:
            return max(0.0, self.carbon.connected_at + PROBATION - now) + 0.001
        if self._search is not None and self._search.written_at is not None:
            search = self._search
            return max(0.0, search.written_at + search.probe_wait - now) + 0.001
        if self._replaying and self.replay_rate and self._current is None and (
                self.backlog):
            return max(0.0, -self._tokens / self.replay_rate) + 0.001
        return None

    def _sent(self, data, line_count):
        self._current = None
        self.lines_sent += line_count
        if self._search is not None:
            self._search.written_at = self.clock()  # the verdict comes in flush()
            return
        self.backlog.sent()
        self.window.add([Chunk(self._current_sent_at or self.clock(), data, line_count)],
                        self._healthy)

    def _requeue_recent(self):
        """After a break: what Carbon may have lost is sent first, in order."""
        if self._current is not None and self._search is None:
            data, line_count = self._current
            self.window.resend.appendleft(
                Chunk(self._current_sent_at or self.clock(), data, line_count))
        self._current = None
        return self.window.requeue()

    def _after_break(self):
        """A connection broke: a probe failed, or maybe a search must start."""
        search = self._search
        if search is not None:
            if search.probe is not None:
                search.failed()
                if search.done:
                    self._end_search()
            return
        now = self.clock()
        wait = self._poison_watch.search_wait_after_break(
            self.window.resend[0].data if self.window.resend else None,
            now - self._first_write_at if self._first_write_at else 0.0, now)
        if wait is not None:
            self._search = PoisonSearch(self.window.resend, wait)
            self.window.resend.clear()
            log.warning("Carbon dropped the connection twice on the same lines; looking "
                        "for the line it refuses", extra={
                            "carbon": self._where(), "lines": self._search.lines,
                            "probe_seconds": round(wait, 2)})

    def _end_search(self):
        search, self._search = self._search, None
        self._poison_watch.search_ended(search.aborted, self.clock())
        if self.carbon.connected:
            self.carbon.down_since = None  # the outage kept open for the search is over
        self.window.resend.extendleft(reversed(search.suspects))  # not delivered: sent next
        if search.culprit is not None:
            self.dead_letters.add(search.culprit[1], self._where())
        elif search.aborted:
            log.error("Carbon drops even a connection that sends nothing: no line is to "
                      "blame; keeping every line", extra={
                          "carbon": self._where(), "next_search_seconds": SEARCH_COOLDOWN})
        else:
            log.warning("every line went through on its own; resuming", extra={
                "carbon": self._where()})

    def _start_replay(self):
        self._replaying = True
        self._tokens, self._tokens_at = 0.0, self.clock()

    def adopt_orphan_spools(self):
        """Lines another worker spooled and left go out as a backlog, at the replay rate."""
        if self.backlog.adopt_orphans() and not self._replaying:
            self._start_replay()

    def save_to_spool(self):
        """On the way out: put everything not yet sent into the spool.

        Returns the number of lines that could not be kept (no spool, or it failed).
        """
        if self._current is not None and self._search is None:  # a probe is a suspect
            self.window.resend.appendleft(Chunk(None, *self._current))
        self._current = None
        held = self._held_for_resend()
        self._search = None
        self.window.forget_held()
        lines = self.backlog.save(held)
        self.dropped_lines += lines
        return lines

    def close(self):
        self.carbon.close()

    @property
    def connected(self):
        return self.carbon.connected

    def retry_within(self, seconds):
        """From now on, never wait longer than ``seconds`` between attempts (for a stop)."""
        self.carbon.retry_within(seconds)

    # -- what the connection tells -----------------------------------------

    def connected_to_carbon(self):
        """The connection is up: on probation, and what it sends first depends why."""
        self._first_write_at = None
        self._healthy = False
        if self._search is not None:
            log.debug("connected to Carbon to send a probe", extra={"carbon": self._where()})
        elif self.carbon.down_since is not None:
            self._start_replay()
            log.warning("Carbon connection restored; sending the backlog", extra={
                "carbon": self._where(), "buffered_lines": self.queued_lines,
                "spooled_bytes": self.spooled_bytes,
                "down_seconds": round(self.clock() - self.carbon.down_since, 1)})
            self.carbon.down_since = None
        else:
            log.debug("connected to Carbon", extra={"carbon": self._where()})
        self.flush()

    def lost(self, why):
        """An established connection broke."""
        self.carbon.close()
        self.reconnects += 1
        resent = self._requeue_recent()
        self._after_break()
        if self._search is not None:
            self.carbon.healthy()  # the probes break it on purpose: no backoff
        self.carbon.down("lost the connection to Carbon", why, resent_lines=resent)

    def _where(self):
        return str(self.address)


class CarbonConnection:
    """The socket to one Carbon: connecting without blocking, the backoff between
    attempts (an outage logged once), and its events.  It tells ``sender`` when it is
    up (``connected_to_carbon``), writable (``flush``) or lost (``lost``)."""

    def __init__(self, address, selector, clock, sender):
        self.address = address
        self.selector = selector
        self.clock = clock
        self.sender = sender
        self.sock = None
        self.connected = False
        self.connected_at = None
        self.down_since = None  # the outage, logged when it began
        self._events = 0
        self._backoff = INITIAL_BACKOFF
        self._max_backoff = MAX_BACKOFF
        self._next_attempt = 0.0

    def due(self, now):
        """No socket, and time to try again."""
        return self.sock is None and now >= self._next_attempt

    def seconds_to_attempt(self, now):
        return max(0.0, self._next_attempt - now)

    def healthy(self):
        """It stayed up (or broke on purpose): the next attempt waits the least again."""
        self._backoff = INITIAL_BACKOFF

    def on_event(self, mask):
        if not self.connected:
            self._finish_connect()
            return
        if mask & selectors.EVENT_READ:
            try:
                data = self.sock.recv(_DRAIN_SIZE)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError as e:
                self.sender.lost(e.strerror or str(e))
                return
            if data == b"":
                self.sender.lost("Carbon closed the connection")
                return
        if mask & selectors.EVENT_WRITE:
            self.sender.flush()

    def watch(self, events):
        if events != self._events:
            self.selector.modify(self.sock, events, self.on_event)
            self._events = events

    def connect(self):
        try:
            family, _, _, _, sockaddr = socket.getaddrinfo(
                self.address.host, self.address.port, type=socket.SOCK_STREAM)[0]
        except OSError as e:
            self.down("cannot resolve Carbon's address", str(e))
            return
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as e:  # out of descriptors, say: try again later
            self.down("cannot open a socket to Carbon", e.strerror or str(e))
            return
        sock.setblocking(False)
        err = sock.connect_ex(sockaddr)
        if err not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
            sock.close()
            self.down("cannot reach Carbon", errno.errorcode.get(err, str(err)))
            return
        self.sock = sock
        self._events = selectors.EVENT_WRITE
        self.selector.register(sock, self._events, self.on_event)

    def _finish_connect(self):
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.close()
            self.down("cannot reach Carbon", errno.errorcode.get(err, str(err)))
            return
        self.connected = True
        self.connected_at = self.clock()
        self.sender.connected_to_carbon()

    def close(self):
        if self.sock is not None:
            self.selector.unregister(self.sock)
            self.sock.close()
            self.sock = None
            self.connected = False

    def down(self, what, why, **extra):
        """Log the outage once, and try again after the backoff."""
        if self.down_since is None:
            self.down_since = self.clock()
            log.error("%s; keeping lines until it is back", what,
                      extra=dict(carbon=str(self.address), error=why, **extra))
        self._next_attempt = self.clock() + self._backoff
        self._backoff = min(self._backoff * 2, self._max_backoff)

    def retry_within(self, seconds):
        """From now on, never wait longer than ``seconds`` between attempts."""
        self._max_backoff = seconds
        self._backoff = min(self._backoff, seconds)
        self._next_attempt = min(self._next_attempt, self.clock() + seconds)
