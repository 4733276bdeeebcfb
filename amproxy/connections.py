"""A client connection as a worker holds it, the PROXY header it may start with, and
the slots each source may take (so that one source never takes every slot)."""

import collections
import ipaddress
import logging

from .errors import CloseConnection
from .logs import ClosedConnectionLog
from .proxyprotocol import LOOPBACK, ProxyHeaderError, client_address
from .proxyprotocol import parse as parse_proxy_header
from .tls import HANDSHAKE_TIMEOUT

log = logging.getLogger("amproxy.worker")  # the worker's log, as before the move

# --proxy-protocol: a connection must send its PROXY header within this long.
PROXY_HEADER_TIMEOUT = 5.0


# A client connection's states, in the order it goes through them.
HEADER = "header"  # --proxy-protocol: waiting for its PROXY header
HANDSHAKE = "handshake"  # a TLS listener's: the handshake is under way
LINES = "lines"  # reading lines
CLOSED = "closed"


class Connection:
    """One client connection: its state (``HEADER`` -> ``HANDSHAKE`` -> ``LINES`` ->
    ``CLOSED``; a connection starts at the first that applies to its listener) and
    since when, the partial line it has sent so far, and its per-source slot.

    ``last_active`` is when it last sent a line that was accepted: a client
    that sends nothing valid is idle, however much it sends.
    """

    __slots__ = ("sock", "address", "source", "slot", "partial", "last_active", "state",
                 "since", "tls", "fresh", "watched", "key")

    def __init__(self, sock, address, now, tls=False, proxy_header=False):
        self.sock = sock
        self.set_address(address)
        self.slot = None  # the SourceSlots group it is counted in, once it is
        self.watched = False  # registered with the worker's selector
        self.partial = b""
        self.last_active = now
        self.tls = tls
        self.state = HANDSHAKE if tls else HEADER if proxy_header else LINES
        self.since = now  # when it entered its state
        self.fresh = True  # nothing read yet
        self.key = None  # the public key of its last signed line that passed

    def enter(self, state, now):
        self.state = state
        self.since = now

    def resume(self, now):
        """Reading again after a pause: no time ran out meanwhile."""
        self.last_active = self.since = now

    def late(self, now, idle_timeout):
        """What ``now`` is too late for: "PROXY header", "TLS handshake", "idle" or None."""
        if self.state == HEADER:
            return "PROXY header" if now - self.since > PROXY_HEADER_TIMEOUT else None
        if self.state == HANDSHAKE:
            return "TLS handshake" if now - self.since > HANDSHAKE_TIMEOUT else None
        return "idle" if now - self.last_active > idle_timeout else None

    def split(self, data, max_length):
        """The whole lines in what was read (after the partial line so far), and how many
        were longer than ``max_length`` (left out; then the unfinished line is dropped,
        counted too if it is past the limit, and the connection is to be closed)."""
        if self.partial:
            data = self.partial + data
        end = data.rfind(b"\n") + 1
        self.partial = data[end:]
        # splitlines also ends lines at \r, so \r\n endings cost nothing.
        lines = data[:end].splitlines()
        if len(self.partial) <= max_length and (
                end <= max_length or max(map(len, lines)) <= max_length):
            return lines, 0
        kept = [line for line in lines if len(line) <= max_length]
        too_long = len(lines) - len(kept) + (len(self.partial) > max_length)
        self.partial = b""
        return kept, too_long

    def last_lines(self):
        """At the end of the stream: the last line counts even without a newline."""
        lines, self.partial = self.partial.splitlines(), b""
        return lines

    def set_address(self, address):
        self.address = address
        self.source = address[0] if isinstance(address, tuple) else str(address) or "unix"

    @property
    def remote(self):
        """host:port, for logs (made only when one is written)."""
        address = self.address
        if not isinstance(address, tuple):
            return self.source
        return ("[%s]:%d" if ":" in address[0] else "%s:%d") % address[:2]


class ProxyHeaders(ClosedConnectionLog):
    """--proxy-protocol: take the header off each new connection; count and log the bad."""

    def __init__(self, clock, balancers):
        super().__init__(log, clock, " (--proxy-protocol is on)")
        self.balancers = balancers  # --proxy-protocol-from; empty: loopback only

    def refuses(self, conn):
        """Whether ``conn`` is from no balancer that may send headers (then counted, logged)."""
        if self.trusts(conn.source, self.balancers):
            return False
        self.error(conn, "%s is not a --proxy-protocol-from address%s" % (
            conn.source, "" if self.balancers else " (default: loopback only)"))
        return True

    def take(self, conn, data):
        """The bytes after ``conn``'s header once it is complete (b"" if none); None until then.

        ``data`` is what was just read (b"": the client closed).  Raises
        CloseConnection when the client closed, or sent no valid header
        (counted and logged; a balancer's health check, which sends nothing
        and closes, is not an error).
        """
        if not data:
            if conn.partial:
                self.error(conn, "closed before the end of its PROXY header")
            raise CloseConnection()
        data = conn.partial + data
        try:
            header = parse_proxy_header(data)
        except ProxyHeaderError as e:
            self.error(conn, str(e))
            raise CloseConnection() from None
        if header is None:
            conn.partial = data
            return None
        length, source = header
        if source is not None:  # else a LOCAL connection: the balancer's own
            conn.set_address(source)
        conn.partial = b""
        return data[length:]

    @staticmethod
    def trusts(peer, balancers):
        """Whether ``peer`` may send headers: one of ``balancers`` (networks), or if none
        are given, a loopback address (a balancer on this host)."""
        try:
            address = ipaddress.ip_address(client_address(ipaddress.ip_address(peer)))
        except ValueError:  # a Unix socket, say
            return False
        return any(address in network for network in balancers or LOOPBACK)


class SourceSlots:
    """Connections per source, so that one source never takes every slot.

    A source is an IPv4 address (an IPv4 client mapped into IPv6 included), or
    the IPv6 network of ``ipv6_prefix`` bits around an IPv6 address: a host
    usually has a whole /64 to pick addresses from.  Counts are kept per
    group key, which a connection keeps until it gives its slot back.
    """

    def __init__(self, ipv6_prefix=64):
        self.ipv6_prefix = ipv6_prefix  # --source-ipv6-prefix
        self._counts = collections.Counter()
        self.per_source = self.per_waiting_peer = 1

    def limit(self, max_connections, per_source, ipv6_prefix):
        """Take the options: ``per_source`` connections from one source (0: 90% of
        ``max_connections``, so that one never takes them all), and IPv6 grouping.

        A connection waiting for its PROXY header counts against its peer, the
        balancer, whose connections each wait a moment: a limit meant for one
        device must not cap them, only the share that leaves others room.
        """
        share = max(1, max_connections * 9 // 10)
        self.per_source = per_source or share
        self.per_waiting_peer = max(self.per_source, share)
        self.ipv6_prefix = ipv6_prefix

    def room(self, source, waiting=False):
        """The key of ``source``'s group if it has room for one more connection (one
        still ``waiting`` for its PROXY header, if so), else None."""
        key = self.key(source)
        return key if self.admits(
            key, self.per_waiting_peer if waiting else self.per_source) else None

    def key(self, source):
        """The group that ``source`` (an address as text, or a name) counts in."""
        if ":" not in source:
            return source  # IPv4, one address; or not an address at all
        try:
            address = ipaddress.IPv6Address(source)
        except ValueError:
            return source
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        host_bits = 128 - self.ipv6_prefix
        return str(ipaddress.IPv6Network((int(address) >> host_bits << host_bits,
                                          self.ipv6_prefix)))

    def admits(self, key, cap):
        """Room for one more in group ``key``, with at most ``cap`` in one group?"""
        return self._counts[key] < cap

    def add(self, key):
        self._counts[key] += 1

    def remove(self, key):
        self._counts[key] -= 1
        if not self._counts[key]:
            del self._counts[key]

    def move(self, key, source, cap=None):
        """Give back a slot of group ``key`` and take one of ``source``'s group if it
        holds fewer than ``cap`` (the per-source limit): its key, or None (then no
        slot is held)."""
        self.remove(key)
        key = self.key(source)
        if not self.admits(key, self.per_source if cap is None else cap):
            return None
        self.add(key)
        return key
