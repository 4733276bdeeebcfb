"""The connection shapes of a fleet, as load generators for bench.py.

- storm: N devices from many loopback addresses connect at once (non-blocking
  connects fired together), each sends one signed line as soon as it is
  connected and stays connected;
- churn: T client threads, each connects, sends one line and closes, N in all
  (as the original's test-client does);
- TLS churn: the same over TLS, each new connection resuming the session of
  the one before it (or not).

Each returns when its clients are done; bench.py times delivery at the sink.
"""

import base64
import hashlib
import hmac
import resource
import select
import selectors
import socket
import ssl
import threading
import time

# Loopback source addresses of a storm: 127.0.X.Y, away from 127.0.0.1.
SOURCE_NETWORK_START = 2 << 8
# Churn's connections come from this many addresses, 127.1.X.Y.
CHURN_SOURCES = 250 * 256


def signed_line(secret, public_key, metric, value, timestamp):
    text = b"%s %d %d %s" % (metric.encode(), value, timestamp, public_key.encode())
    return text + b" " + base64.b64encode(
        hmac.new(secret.encode(), text, hashlib.sha256).digest()) + b"\n"


def signed_lines(keys, count):
    """``count`` signed lines, each of one of ``keys`` (name, secret, metrics) in turn,
    with a timestamp of now."""
    now = int(time.time())
    lines = []
    for i in range(count):
        name, secret, metrics = keys[i % len(keys)]
        metric = metrics[(i // len(keys)) % len(metrics)]
        lines.append(signed_line(secret, name, metric, i % 1000, now))
    return lines


def listen_overflows():
    """The kernel's count of connections dropped because an accept queue was full."""
    with open("/proc/net/netstat") as f:
        rows = [line.split() for line in f if line.startswith("TcpExt:")]
    names, values = rows[0], rows[1]
    return int(values[names.index("ListenOverflows")])


def raise_open_files(wanted):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class Storm:
    """``len(lines)`` devices, ``per_source`` from each loopback address: each connects,
    sends its line once connected, and stays connected until ``close``."""

    def __init__(self, lines, per_source=40):
        raise_open_files(len(lines) + 256)
        self.lines = lines
        self.socks = []
        for i in range(len(lines)):
            source = SOURCE_NETWORK_START + i // per_source
            sock = socket.socket()
            sock.setblocking(False)
            sock.bind(("127.0.%d.%d" % (source >> 8, source & 255), 0))
            self.socks.append(sock)
        self.failed = 0

    def fire(self, port, timeout=60):
        """Connect every socket at once; send each line once connected.  Returns when all
        are sent (or failed, or ``timeout``)."""
        selector = selectors.DefaultSelector()
        for sock, line in zip(self.socks, self.lines):
            sock.connect_ex(("127.0.0.1", port))
            selector.register(sock, selectors.EVENT_WRITE, line)
        waiting = len(self.socks)
        deadline = time.monotonic() + timeout
        while waiting and time.monotonic() < deadline:
            for key, _ in selector.select(0.5):
                selector.unregister(key.fileobj)
                waiting -= 1
                try:
                    key.fileobj.send(key.data)
                except OSError:
                    self.failed += 1
        self.failed += waiting
        selector.close()

    def close(self):
        for sock in self.socks:
            sock.close()


def churn(port, lines, threads=8, wrap=None):
    """Each of ``threads`` threads connects, sends one line and closes, for its share of
    ``lines``.  ``wrap(sock, state)`` makes a TLS connection of a plain one (``state``
    is the thread's own dict, to keep a session in).  Returns how many failed."""
    failed = []

    def run(thread, share):
        state = {}
        for i, line in enumerate(share):
            # Each connection from its own source address (127.1.X.Y), as a fleet's
            # are: one address would soon reuse a port still in TIME_WAIT from the
            # run before, and stall on SYN retransmissions that are no one's fault.
            source = (thread * len(share) + i) % CHURN_SOURCES
            try:
                sock = socket.create_connection(("127.0.0.1", port), source_address=(
                    "127.1.%d.%d" % (source // 250, 1 + source % 250), 0))
                if wrap is not None:
                    sock = wrap(sock, state)
                with sock:
                    sock.sendall(line)
            except OSError:
                failed.append(1)
    workers = [threading.Thread(target=run, args=(t, lines[t::threads])) for t in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    return len(failed)


def tls_wrapper(context, resume, ticket_wait=1.0):
    """A ``wrap`` for churn: a TLS client that resumes the thread's last session if
    ``resume``; it counts the resumed handshakes in ``wrapper.resumed``.  Like a device
    that resumes, it reads until its ticket is in (a TLS 1.3 server sends it after
    the handshake; one left unread would reset the connection at close)."""
    def wrap(sock, state):
        tls = context.wrap_socket(sock, server_hostname="127.0.0.1",
                                  session=state.get("session") if resume else None)
        if tls.session_reused:
            wrap.resumed += 1
        deadline = time.monotonic() + ticket_wait
        tls.setblocking(False)
        while not tls.session.has_ticket and time.monotonic() < deadline:
            select.select([tls], [], [], max(0.0, deadline - time.monotonic()))
            try:
                tls.recv(1)
            except ssl.SSLWantReadError:
                pass
        tls.setblocking(True)
        state["session"] = tls.session
        return tls
    wrap.resumed = 0
    return wrap


class Stream:
    """``devices`` connected devices, each sending ``next_line(device)`` every
    ``interval`` seconds, as a well-behaved device does: it watches for the end of
    the stream and, when the server closes, closes too and connects again.

    Counted: ``sent`` (line -> written whole), ``refused`` (connections refused),
    ``reconnects`` (closed by the server, then connected again), ``resets``
    (connections reset: the server closed with bytes unread) and ``send_errors``
    (a write refused; that line is written again on the next connection).
    """

    def __init__(self, port, devices, next_line, interval=0.5, per_source=40):
        raise_open_files(devices + 256)
        self.port = port
        self.devices = devices
        self.next_line = next_line
        self.interval = interval
        self.per_source = per_source
        self.sent = []
        self.refused = self.reconnects = self.resets = self.send_errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._selector = selectors.DefaultSelector()
        self._unsent = {}  # device -> a line whose write failed

    def start(self):
        self._thread.start()
        return self

    def stop(self, timeout=30):
        self._stop.set()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the device stream did not stop"
        for key in list(self._selector.get_map().values()):
            key.fileobj.close()
        self._selector.close()

    def _connect(self, device):
        source = SOURCE_NETWORK_START + device // self.per_source
        sock = socket.socket()
        sock.setblocking(False)
        sock.bind(("127.0.%d.%d" % (source >> 8, source & 255), 0))
        sock.connect_ex(("127.0.0.1", self.port))
        self._selector.register(sock, selectors.EVENT_WRITE, [device, False, 0.0])

    def _run(self):
        for device in range(self.devices):
            self._connect(device)
        while not self._stop.is_set():
            now = time.monotonic()
            for key, _ in self._selector.select(0.01):
                self._on_event(key, now)
            for key in list(self._selector.get_map().values()):
                device, connected, due = key.data
                if connected and now >= due:
                    self._send(key, now)

    def _on_event(self, key, now):
        sock, (device, connected, _) = key.fileobj, key.data
        if not connected:
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            self._selector.unregister(sock)
            if error:
                sock.close()
                self.refused += 1
                self._connect(device)
                return
            # Spread over the interval, so that the lines do not come in waves.
            due = now + self.interval * (device % 97) / 97
            self._selector.register(sock, selectors.EVENT_READ, [device, True, due])
            return
        try:
            data = sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.resets += 1
            data = b""
        if not data:  # the server ended the stream: connect again
            self._selector.unregister(sock)
            sock.close()
            self.reconnects += 1
            self._connect(device)

    def _send(self, key, now):
        device = key.data[0]
        line = self._unsent.pop(device, None) or self.next_line(device)
        key.data[2] = now + self.interval
        try:
            written = key.fileobj.send(line)
        except OSError:
            written = 0
        if written == len(line):
            self.sent.append(line)
            return
        self.send_errors += 1
        if written:  # never seen with lines this short; kept honest if it happens
            raise AssertionError("a line was written in part")
        self._unsent[device] = line
