"""A worker's client connections: admitting them, their per-source slots, PROXY
headers, TLS handshakes and timeouts, watching them, and closing them.

The worker's hot path (``read``, given at construction) reads their lines; it
asks this table to take a PROXY header off (``after_proxy_header``), to go on
with a handshake (``handshake``) and to ``close`` a connection.
"""

import logging
import selectors
import socket

from .connections import (CLOSED, HANDSHAKE, HEADER, LINES, PROXY_HEADER_TIMEOUT, Connection,
                          ProxyHeaders, SourceSlots)
from .errors import CloseConnection
from .logs import ClosedConnectionLog
from .tls import HANDSHAKE_TIMEOUT, TLS_HANDSHAKE_RECORD

log = logging.getLogger("amproxy.worker")  # the worker's log: these are its connections


class Clients:
    """``connections``: fd -> :class:`Connection`, each registered with ``selector``
    (calling ``read(conn)``) unless reading is paused."""

    def __init__(self, options, selector, clock, tls, read):
        self.options = options
        self.selector = selector
        self.clock = clock
        self.tls = tls  # tls.TlsConnections
        self.read = read
        self.connections = {}
        # Public key -> (address, tls, its last line's time on the monotonic clock) of
        # connections closed since the device table's last record.
        self.departed = {}
        self.paused = False
        self.opened = 0
        self.source_slots = SourceSlots(options.source_ipv6_prefix)
        self.proxy_headers = ProxyHeaders(clock, options.proxy_protocol_from)
        # Closed at once by --max-connections-per-source (an abuse limit).
        self.refusals = ClosedConnectionLog(log, clock, " (--max-connections-per-source)")

    def __len__(self):
        return len(self.connections)

    def limit(self, max_connections):
        options = self.options
        self.source_slots.limit(max_connections, options.max_connections_per_source,
                                options.source_ipv6_prefix)

    def admit(self, listener, sock, address):
        """A client the acceptor took: refuse it, or read what it sent and watch it."""
        # Behind a balancer the address is the balancer's; the client's comes with the header.
        conn = Connection(sock, address, self.clock(), listener.tls, self.options.proxy_protocol)
        if conn.state == HEADER and self.proxy_headers.refuses(conn):
            sock.close()
            return
        waiting = conn.state == HEADER
        slot = self.source_slots.room(conn.source, waiting)
        if slot is None:
            self.refusals.error(conn, "too many connections from its address" + (
                " waiting for their PROXY header" if waiting else ""))
            sock.close()
            return
        sock.setblocking(False)
        if conn.tls:
            try:
                sock = conn.sock = self.tls.wrap(sock)
            except OSError:  # reset before it could be wrapped: a health check, say
                sock.close()
                return
        self.connections[sock.fileno()] = conn
        conn.slot = slot
        self.source_slots.add(slot)
        self.opened += 1
        # A device sends as soon as it is connected: its line (and, from a client that
        # sends one line and closes, the end of the stream) is often here already, and
        # reading it now saves watching the connection at all.
        if self.read(conn) and conn.state != CLOSED:
            self.read(conn)
        if conn.state != CLOSED and not conn.watched and not self.paused:
            self.watch(conn)

    def watch(self, conn, events=selectors.EVENT_READ):
        self.selector.register(conn.sock, events, self._reader(conn))
        conn.watched = True

    def _reader(self, conn):
        """The selector's callback for ``conn``: read it."""
        return lambda mask: self.read(conn)

    def handshake(self, conn):
        """Go on with a TLS handshake; once done, read what came with it."""
        if conn.fresh:
            try:
                first = socket.socket.recv(conn.sock, 1, socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                first = b""
            if not first:  # connected and closed: a balancer's health check, not an error
                self.close(conn)
                return
            conn.fresh = False
        try:
            wait = self.tls.handshake(conn)
        except CloseConnection:
            self.close(conn)
            return
        events = selectors.EVENT_WRITE if wait == "write" else selectors.EVENT_READ
        if conn.watched:
            self.selector.modify(conn.sock, events, self._reader(conn))
        elif wait == "write" and not self.paused:
            self.watch(conn, events)  # while it is admitted: it waits to write
        if wait is None:
            conn.enter(LINES, self.clock())
            self.read(conn)  # lines may have come with the last handshake record

    def first_read(self, conn, data):
        """The first bytes of a connection: False if they close it (TLS on the plain port)."""
        conn.fresh = False
        if data[:2] == TLS_HANDSHAKE_RECORD and not conn.tls:
            self.tls.error(conn, "TLS on the plain port (use --tls-addr's port)")
            self.close(conn)
            return False
        return True

    def after_proxy_header(self, conn, data):
        """What the client sent after its PROXY header, once its source is admitted; else None."""
        try:
            rest = self.proxy_headers.take(conn, data)
        except CloseConnection:
            self.close(conn)
            return None
        if rest is None:
            return None
        # The slot it held as its peer's becomes the client's, if the client has room.
        conn.enter(LINES, self.clock())
        conn.slot = self.source_slots.move(conn.slot, conn.source)
        if conn.slot is None:
            self.refusals.error(conn, "too many connections from its address")
            self.close(conn)
            return None
        return rest

    def close(self, conn, why=None, **extra):
        """Close ``conn``; ``why``, if given, is logged (a warning, with ``extra``)."""
        if why is not None:
            log.warning("closing client connection: %s", why,
                        extra=dict(extra, remote=conn.remote))
        if conn.watched:
            self.selector.unregister(conn.sock)
        del self.connections[conn.sock.fileno()]
        if conn.slot is not None:
            self.source_slots.remove(conn.slot)
        if conn.key is not None:  # for the device table: where this key last came from
            self.departed[conn.key] = (conn.source, conn.tls, conn.last_active)
        conn.sock.close()
        conn.state = CLOSED

    def close_all(self):
        for conn in list(self.connections.values()):
            self.close(conn)

    def set_paused(self, paused):
        """Stop or resume reading clients (back-pressure while Carbon cannot keep up)."""
        self.paused = paused
        for conn in self.connections.values():
            if paused:
                if conn.watched:
                    self.selector.unregister(conn.sock)
                    conn.watched = False
            else:
                conn.resume(self.clock())
                events = selectors.EVENT_READ
                if conn.state == HANDSHAKE:
                    events |= selectors.EVENT_WRITE  # it may have been waiting to write
                self.watch(conn, events)

    def close_late(self, now):
        """Close the connections late for their header or handshake, or idle too long.
        Paused, nothing is read: no client is late or idle meanwhile."""
        for conn in [] if self.paused else list(self.connections.values()):
            late = conn.late(now, self.options.idle_timeout)
            if late == "idle":
                log.info("closing idle client connection", extra={
                    "remote": conn.remote, "idle_seconds": round(now - conn.last_active)})
            elif late is not None:  # counted and logged as a failed header or handshake
                if conn.state == HEADER:
                    self.proxy_headers.error(
                        conn, "no PROXY header within %d s" % PROXY_HEADER_TIMEOUT)
                else:
                    self.tls.error(conn, "no TLS handshake within %d s" % HANDSHAKE_TIMEOUT)
            if late is not None:
                self.close(conn)

    def half_close(self):
        """Stopping: tell plain clients that the stream ends.  One that reads sees the end
        and closes after its last line, which is then read, instead of writing into a
        socket about to close; it reconnects to a worker still accepting."""
        for conn in self.connections.values():
            if conn.state == LINES and not conn.tls:
                try:
                    conn.sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

    def drain(self, finish_lines, count_unfinished):
        """Stopping: close each client once what it sent is read.  ``finish_lines``: the
        grace is over (for a half-sent line, and for a plain client to close its side),
        so read once more and close what is left unfinished (``count_unfinished(conn)``
        counts a line cut off)."""
        for conn in list(self.connections.values()):
            if not conn.partial:
                # A plain client (lines, or a PROXY header still on its way) has the
                # grace to close its side, or to send what it was sending.
                if finish_lines or conn.tls:
                    self.close_if_drained(conn)  # a PROXY header and lines may be waiting
            elif finish_lines:
                self.read(conn)  # what already arrived may finish the line
                if conn.state == CLOSED or not conn.partial:
                    continue
                if conn.state == HEADER:
                    self.proxy_headers.error(conn, "stopping, and its PROXY header is not "
                                             "complete")
                else:
                    count_unfinished(conn)
                    log.warning("closing client connection at stop: it did not finish its "
                                "line", extra={"remote": conn.remote})
                self.close(conn)

    def close_if_drained(self, conn):
        """Stopping: close a client once nothing it sent is left unread (it reconnects)."""
        if conn.tls and conn.sock.pending():
            return  # decrypted and waiting: the next read takes it
        try:
            # The bytes on the socket (for TLS, still encrypted) tell whether any are left.
            pending = socket.socket.recv(conn.sock, 1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            pending = None
        except OSError:
            pending = b""
        if pending == b"":
            self.read(conn)  # reads the end of the stream and closes
        elif pending is None:
            self.close(conn)

    def counters(self):
        return {"connectionsOpened": self.opened,
                "connectionsRefused": self.refusals.count,
                "proxyHeaderErrors": self.proxy_headers.count}
