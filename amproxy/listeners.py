"""Listening sockets, and how a worker takes new clients from them.

The master binds one ``Listener`` per address and kind (plain, TLS) and hands
the list to every worker.  Each worker's ``Acceptor`` decides whether it
takes the next clients, and takes them in batches.

How connections are shared out.  All workers share each listening socket;
whoever accepts first gets the connection.  A worker watches the sockets
(level-triggered, so every watching worker wakes for a waiting connection)
while it holds no more than the least loaded worker plus a slack of 1 +
1/8 of that: so four busy connections split two and two, while in a storm
of thousands, where counts are large, every worker takes a batch at each
wakeup instead of one connection each in turn.  The least loaded worker
always watches; one that got ahead looks at the table again every
``REBALANCE_INTERVAL``, so it is back before the other has caught up.  A
worker at ``--max-connections`` stops taking clients: they wait in the
kernel's queue (as nginx does at ``worker_connections``) instead of being
accepted and closed.
"""

import errno
import ipaddress
import logging
import resource
import select
import selectors
import socket
import struct

from .balance import NOT_ACCEPTING
from .errors import AmproxyError
from .tls import session_ticket_keys

log = logging.getLogger(__name__)

# The open-file limit the master sets itself when the hard limit is unlimited.
FILE_LIMIT_IF_UNLIMITED = 1 << 20

# The most clients taken per wakeup (nginx's multi_accept, bounded so that a
# storm of connections does not starve the clients already connected).
ACCEPT_BATCH = 64
# How often a worker that left new clients to a less loaded one looks again.
REBALANCE_INTERVAL = 0.001
# Clients still waiting this long after a worker left them to a less loaded one
# are taken anyway: that one may be hung or busy.
TAKEOVER_AFTER = 0.05
# Out of file descriptors: stop accepting this long instead of spinning.
ACCEPT_BACKOFF = 0.5
# At most one log line per this many seconds about a worker at its cap.
CAP_LOG_INTERVAL = 1.0
# Descriptors a worker needs besides its clients (listeners, Carbon connections,
# spool files, pipes, the selector, the auth snapshot); a quarter of a small limit.
RESERVED_DESCRIPTORS = 128


def raise_file_limit(max_connections):
    """Each worker needs a descriptor per client: take the hard limit, as a Go program
    does (1024 is a common soft limit; the systemd unit sets 65536)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    new = FILE_LIMIT_IF_UNLIMITED if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < new:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        except (OSError, ValueError):  # a system call filter, say
            new = soft
    else:
        new = soft
    if max_connections and new != resource.RLIM_INFINITY and new < max_connections + 128:
        log.warning("the open-file limit (%d) is below --max-connections (%d) plus 128; "
                    "raise LimitNOFILE or ulimit -n", new, max_connections)


def connection_limit(max_connections):
    """--max-connections, or for 0 as many clients as the open-file limit leaves room for."""
    if max_connections:
        return max_connections
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        soft = FILE_LIMIT_IF_UNLIMITED
    return max(1, soft - min(RESERVED_DESCRIPTORS, soft // 4))


def listen_backlog():
    """The kernel's own cap on an accept queue (net.core.somaxconn): a larger
    backlog is cut to it anyway, and a smaller one drops a storm's connections."""
    try:
        with open("/proc/sys/net/core/somaxconn") as f:
            return max(128, int(f.read()))
    except (OSError, ValueError):
        return socket.SOMAXCONN


def bind(address, kind="plain"):
    """A listening socket on ``address`` (host, port); AmproxyError names it if it cannot."""
    host, port = address
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(listen_backlog())
    except OSError as e:
        raise AmproxyError("cannot listen on %s:%d: %s" % (host, port, e.strerror or e)) from None
    return Listener(sock, kind)


def same_address(sock, address):
    """Whether ``sock`` listens where ``address`` (host, port) asks; port 0 and a host
    name match any port and any host."""
    host, port = address
    bound_host, bound_port = sock.getsockname()[:2]
    if port and port != bound_port:
        return False
    try:
        return not host or ipaddress.ip_address(host) == ipaddress.ip_address(bound_host)
    except ValueError:
        return True  # a name: resolved at bind time, taken as asked


def _wider(sock, address):
    """Whether ``sock`` listens on every address where ``address`` names one."""
    try:
        return (ipaddress.ip_address(sock.getsockname()[0]).is_unspecified
                and not ipaddress.ip_address(address[0] or "0.0.0.0").is_unspecified)
    except ValueError:
        return False  # a host name: taken as asked


def open_listeners(addr, tls_addr, inherited):
    """The plain listener, and the TLS one if ``tls_addr`` is set.

    ``inherited`` are (socket, name) pairs passed by an upgraded master (named
    "plain" and "tls") or by systemd's socket unit (any name): a socket named for
    its kind is used if it is still on the configured address; systemd's are
    matched by address, and the plain listener takes the first one that matches
    neither (the unit's ListenStream= decides it).  Anything else is bound here.
    """
    named = {name: sock for sock, name in inherited if name in ("plain", "tls")}
    others = [sock for sock, name in inherited if name not in ("plain", "tls")]
    listeners = []
    wanted = [("plain", addr)] + ([("tls", tls_addr)] if tls_addr else [])
    for kind, address in wanted:
        sock = named.pop(kind, None)
        if sock is not None and not same_address(sock, address):
            log.warning("the %s address changed; closing the old listening socket", kind,
                        extra={"old": Listener.describe(sock), "new": "%s:%d" % address})
            sock.close()
            sock = None
        if sock is None:
            sock = next((s for s in others if same_address(s, address)), None)
            unclaimed = [s for s in others if not any(same_address(s, a) for _, a in wanted)]
            if sock is None and kind == "plain" and unclaimed:
                sock = unclaimed[0]
                if _wider(sock, address):
                    raise AmproxyError(
                        "the socket systemd passed listens on %s, on more addresses than "
                        "addr %s:%d allows; set ListenStream= in amproxy.socket (systemctl "
                        "edit amproxy.socket) or addr to the same address"
                        % ((Listener.describe(sock),) + tuple(address)))
                log.warning("listening where systemd's socket unit says, not on addr; set "
                            "ListenStream= in amproxy.socket to change it",
                            extra={"listening": Listener.describe(sock),
                                   "addr": "%s:%d" % address})
            if sock is not None:
                others.remove(sock)
        listeners.append(Listener(sock, kind) if sock is not None else bind(address, kind))
    for sock in list(named.values()) + others:
        log.warning("closing an inherited listening socket that no option asks for",
                    extra={"listening": Listener.describe(sock)})
        sock.close()
    return listeners


class Listener:
    """One listening socket and the kind of client it serves ("plain" or "tls")."""

    def __init__(self, sock, kind="plain"):
        # Workers share this socket; whoever loses the race to accept must not block.
        sock.setblocking(False)
        self.sock = sock
        self.kind = kind
        self.tls = kind == "tls"
        # Drawn before the workers are forked, so all of them share them.
        self.ticket_keys = session_ticket_keys() if self.tls else None
        # tls.CertificateFiles: the last good pair, which the master sets (a worker
        # forked later loads this one).
        self.certificate = None

    def address(self):
        return self.describe(self.sock)

    @staticmethod
    def describe(sock):
        host, port = sock.getsockname()[:2]
        return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)

    def waiting(self):
        """Connections in the kernel's accept queue (Linux reports it as a listening
        socket's tcpi_unacked); 1 where that cannot be read."""
        try:
            return struct.unpack_from("I", self.sock.getsockopt(
                socket.IPPROTO_TCP, socket.TCP_INFO, 32), 24)[0]
        except (OSError, AttributeError, struct.error):
            return 1

    def fileno(self):
        return self.sock.fileno()

    def close(self):
        self.sock.close()


class Acceptor:
    """A worker's side of the listeners: whether it takes new clients now, and taking them.

    ``admit(listener, sock, address)`` is the worker's: it makes the connection
    (or refuses it).  ``count()`` is how many clients the worker holds.
    """

    def __init__(self, listeners, selector, table, slot, clock, admit, count):
        self.listeners = listeners
        self.selector = selector
        self.table = table
        self.slot = slot
        self.clock = clock
        self.admit = admit
        self.count = count
        self.watching = False
        self.full = False
        self.paused_until = 0.0
        self.max_connections = 1
        self._left_waiting_since = None
        self.cap_reached = 0  # times this worker filled its --max-connections
        self._cap_logged_at = None

    def drop(self, kind):
        """This worker takes no clients of ``kind`` (say, TLS without a usable certificate)."""
        self.listeners = [listener for listener in self.listeners if listener.kind != kind]

    def update(self, accepting, max_connections):
        """After each turn of the loop: publish the count, watch or not.  The longest the
        loop may sleep before it should look again (None: no limit from here)."""
        self.max_connections = max_connections
        now = self.clock()
        if not accepting or now < self.paused_until:
            self.stop()
            return None if not accepting else self.paused_until - now
        count = self.count()
        if count >= max_connections:
            self._at_cap(max_connections, now)
            return None  # a client leaving wakes the loop
        self.full = False
        self.table.publish(self.slot, count)
        if self.table.allowance(self.slot, count) > 0:
            self._left_waiting_since = None
            self._watch(True)
            return None
        self._watch(False)
        self._take_if_left_waiting(now)
        return REBALANCE_INTERVAL

    def stop(self):
        """Paused, stopping or out of descriptors: others must not wait for this worker."""
        self._watch(False)
        self.table.publish(self.slot, NOT_ACCEPTING)

    def close(self):
        self.stop()
        for listener in self.listeners:
            listener.close()

    def _at_cap(self, max_connections, now):
        self.stop()
        if self.full:
            return
        self.full = True
        self.cap_reached += 1
        if self._cap_logged_at is None or now - self._cap_logged_at >= CAP_LOG_INTERVAL:
            self._cap_logged_at = now
            log.warning("worker at --max-connections; new clients wait in the listen "
                        "queue until one leaves", extra={"max_connections": max_connections,
                                                         "times": self.cap_reached})

    def _watch(self, watch):
        if watch == self.watching:
            return
        for listener in self.listeners:
            if watch:
                self.selector.register(listener.sock, selectors.EVENT_READ,
                                       lambda mask, listener=listener: self.take(listener))
            else:
                self.selector.unregister(listener.sock)
        self.watching = watch

    def take(self, listener, most=ACCEPT_BATCH, anyway=False):
        """Accept what this worker may take now (``anyway``: whatever the table says),
        ``most`` at a time; how many it took."""
        count = self.count()
        room = min(most, self.max_connections - count)
        if not anyway:
            allowed = self.table.allowance(self.slot, count)
            if allowed < room:
                # A long queue is shared whatever the counts: while connections come
                # and go quickly (one line each), the counts say little about load.
                allowed = max(allowed, listener.waiting() // self.table.workers())
            room = min(room, allowed)
        taken = 0
        while taken < room:
            try:
                sock, address = listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                break  # none left, or another worker took it
            except OSError as e:
                if e.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    raise
                # The connection stays queued; retrying at once would only spin.
                log.error("cannot accept a connection: %s; not accepting for %.1f s",
                          e.strerror, ACCEPT_BACKOFF)
                self.paused_until = self.clock() + ACCEPT_BACKOFF
                self.stop()
                return taken
            taken += 1
            self.admit(listener, sock, address)
        self.table.publish(self.slot, self.count())
        return taken

    def _take_if_left_waiting(self, now):
        """Clients left to a less loaded worker are taken here, this worker's share of
        them, when that one is not keeping up: at once if the queue is long (a storm
        while it is busy reading), else once they have waited TAKEOVER_AFTER (it may
        be hung)."""
        waiting = select.select(self.listeners, [], [], 0)[0]
        if not waiting:
            self._left_waiting_since = None
            return
        if self._left_waiting_since is None:
            self._left_waiting_since = now
        overdue = now - self._left_waiting_since >= TAKEOVER_AFTER
        for listener in waiting:
            queued = listener.waiting()
            if overdue or queued >= ACCEPT_BATCH:
                share = max(1, queued // self.table.workers())
                self.take(listener, min(share, ACCEPT_BATCH), anyway=True)
        if overdue:
            self._left_waiting_since = None
