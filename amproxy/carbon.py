"""The per-worker connection to Carbon: non-blocking, buffered, reconnecting.

The worker's read cycle hands over one chunk of Carbon lines; the sender
writes as much as the socket takes and keeps the rest, so a slow or absent
Carbon never blocks the reading of clients.  While Carbon is unreachable it
reconnects with capped exponential backoff.
"""

import errno
import logging
import selectors
import socket

from .buffer import LineBuffer

log = logging.getLogger(__name__)

INITIAL_BACKOFF = 0.1
MAX_BACKOFF = 10.0
# Carbon never writes to us; reading only tells us that it closed the connection.
_DRAIN_SIZE = 4096


class CarbonSender:
    def __init__(self, address, selector, buffer_lines, clock):
        self.address = address
        self.selector = selector
        self.buffer = LineBuffer(buffer_lines)
        self.clock = clock
        self.sock = None
        self.connected = False
        self._events = 0
        self._backoff = INITIAL_BACKOFF
        self._next_attempt = 0.0
        self._down_since = None
        self.reconnects = 0
        self.dropped_lines = 0
        self.sent_lines = 0

    # -- the worker's side -------------------------------------------------

    def enqueue(self, data, line_count):
        """Queue a chunk of Carbon lines; count them as dropped if the buffer is full."""
        if not self.buffer.append(data, line_count):
            if not self.dropped_lines:
                log.error("Carbon buffer full, dropping lines", extra={
                    "carbon": self._where(), "buffer_lines": self.buffer.max_lines})
            self.dropped_lines += line_count

    def flush(self):
        """Write what the socket takes now; connect first if it is time to."""
        if not self.connected:
            if self.sock is None and self.clock() >= self._next_attempt:
                self._connect()
            return
        buffer = self.buffer
        try:
            while buffer:
                before = buffer.lines
                buffer.consume(self.sock.send(buffer.head()))
                self.sent_lines += before - buffer.lines
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as e:
            self._lost(e.strerror or str(e))
            return
        self._watch(selectors.EVENT_READ | (selectors.EVENT_WRITE if buffer else 0))

    @property
    def idle(self):
        return not self.buffer

    def seconds_to_next_attempt(self, now):
        """How long the worker may sleep before ``flush`` has a reconnect to make."""
        if self.sock is not None:
            return None
        return max(0.0, self._next_attempt - now)

    def close(self):
        if self.sock is not None:
            self.selector.unregister(self.sock)
            self.sock.close()
            self.sock = None
            self.connected = False

    # -- socket events -----------------------------------------------------

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
                self._lost(e.strerror or str(e))
                return
            if data == b"":
                self._lost("Carbon closed the connection")
                return
        if mask & selectors.EVENT_WRITE:
            self.flush()

    # -- connection management ---------------------------------------------

    def _where(self):
        return "%s:%d" % self.address

    def _watch(self, events):
        if events != self._events:
            self.selector.modify(self.sock, events, self.on_event)
            self._events = events

    def _connect(self):
        try:
            infos = socket.getaddrinfo(self.address[0], self.address[1],
                                       type=socket.SOCK_STREAM)
            family, _, _, _, sockaddr = infos[0]
        except OSError as e:
            self._failed("cannot resolve: %s" % e)
            return
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        err = sock.connect_ex(sockaddr)
        if err not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
            sock.close()
            self._failed(errno.errorcode.get(err, str(err)))
            return
        self.sock = sock
        self._events = selectors.EVENT_WRITE
        self.selector.register(sock, self._events, self.on_event)

    def _finish_connect(self):
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.close()
            self._failed(errno.errorcode.get(err, str(err)))
            return
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.connected = True
        self._backoff = INITIAL_BACKOFF
        if self._down_since is not None:
            log.warning("Carbon connection restored", extra={
                "carbon": self._where(), "buffered_lines": len(self.buffer),
                "down_seconds": round(self.clock() - self._down_since, 1)})
            self._down_since = None
        else:
            log.debug("connected to Carbon", extra={"carbon": self._where()})
        self.flush()

    def _failed(self, why):
        """A connection attempt failed: try again after the backoff."""
        if self._down_since is None:
            self._down_since = self.clock()
            log.error("cannot reach Carbon; buffering lines and retrying", extra={
                "carbon": self._where(), "error": why})
        self._next_attempt = self.clock() + self._backoff
        self._backoff = min(self._backoff * 2, MAX_BACKOFF)

    def _lost(self, why):
        """An established connection broke: reconnect at once, then back off."""
        self.close()
        self.reconnects += 1
        if self._down_since is None:
            self._down_since = self.clock()
            log.error("lost the connection to Carbon; buffering lines and reconnecting",
                      extra={"carbon": self._where(), "error": why})
        self._next_attempt = self.clock() + self._backoff
        self._backoff = min(self._backoff * 2, MAX_BACKOFF)
