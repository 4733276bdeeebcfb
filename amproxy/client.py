"""A client that signs data points and sends them to amproxy.

    from amproxy.client import Client
    with Client("proxy.example.com:2005", "my_public_key", "my_secret_key") as c:
        c.send("home.temp.living_room", 21.5)

Over TLS (to the server's ``--tls-addr``)::

    Client("proxy.example.com:2443", "my_public_key", "my_secret_key", tls=True,
           ca_file="/etc/ssl/amproxy-ca.pem")
"""

import collections
import logging
import random
import select
import socket
import ssl
import time

from .protocol import Signer
from .tls import client_context

log = logging.getLogger(__name__)


def _parse_address(address):
    if isinstance(address, tuple):
        return address
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def format_address(address):
    """``host:port``, with an IPv6 host in brackets: ``[::1]:2005``."""
    host, port = address
    return ("[%s]:%d" if ":" in host else "%s:%d") % (host, port)


class Client:
    """Signs lines with one key and sends them over one connection.

    Lines are queued by ``send`` and written in batches by ``flush`` (at the
    latest when ``batch_size`` lines are queued).  If the server cannot be
    reached the lines stay queued, up to ``max_queued`` (the oldest go first
    beyond that), and are sent by the next successful ``flush``; a caller
    that cannot wait for a next one passes ``flush(raise_errors=True)``.
    """

    def __init__(self, address, public_key, secret_key, batch_size=500,
                 max_queued=100000, timeout=10.0, tls=False, ca_file=None, cert_file=None,
                 key_file=None):
        self.address = _parse_address(address)
        # With TLS the server's certificate is verified (against ca_file, else the
        # system's CAs) for the host name or address given.
        self._tls = client_context(ca_file, cert_file, key_file) if tls else None
        self._tls_session = None  # the last one, resumed at the next connection
        self.public_key = public_key
        self._signer = Signer(secret_key)
        self.batch_size = batch_size
        self.timeout = timeout
        self._queue = collections.deque(maxlen=max_queued)
        self._sock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def sign_line(self, metric, value, timestamp=None):
        """The wire line (bytes) for one data point."""
        if timestamp is None:
            timestamp = time.time()
        text = ("%s %s %d %s" % (metric, value, int(timestamp), self.public_key)).encode()
        return text + b" " + self._signer.signature(text) + b"\n"

    def send(self, metric, value, timestamp=None):
        self._queue.append(self.sign_line(metric, value, timestamp))
        if len(self._queue) >= self.batch_size:
            self.flush()

    @property
    def queued(self):
        return len(self._queue)

    def flush(self, raise_errors=False):
        """Send every queued line; return True if the queue is now empty.

        If sending fails the lines stay queued and a warning is logged, or
        with ``raise_errors`` the OSError is raised instead (lines still queued).
        """
        if not self._queue:
            return True
        batch = list(self._queue)
        try:
            if self._sock is not None and self._server_ended():
                self._drop_connection()  # the server stops or upgrades: connect again
            if self._sock is None:
                self._sock = self._connect()
            self._sock.sendall(b"".join(batch))
        except OSError as e:
            self._drop_connection()
            if raise_errors:
                raise
            log.warning("cannot send to %s (%s); %d lines kept for later",
                        format_address(self.address), e, len(self._queue))
            return False
        for _ in batch:
            self._queue.popleft()
        return True

    def _server_ended(self):
        """Whether the server ended the stream (or reset it).  amproxy never writes to a
        client, so anything to read is that end: lines written now would be lost."""
        return bool(select.select([self._sock], [], [], 0)[0])

    def _connect(self):
        sock = socket.create_connection(self.address, timeout=self.timeout)
        if self._tls is None:
            return sock
        try:
            started = time.monotonic()
            sock = self._tls.wrap_socket(sock, server_hostname=self.address[0],
                                         session=self._tls_session)
            self._check_accepted(sock, time.monotonic() - started)
            self._tls_session = sock.session  # with its ticket, read by the check
            return sock
        except OSError:
            sock.close()
            raise

    def _check_accepted(self, sock, handshake_seconds):
        """With TLS 1.3 a server refuses a client certificate (or its absence) only after
        the client's side of the handshake is done: wait for that answer (a round trip,
        twice the handshake's time), or the lines sent next would be lost unnoticed.
        amproxy never writes to a client, so anything but silence is a refusal."""
        sock.settimeout(min(max(2 * handshake_seconds, 0.05), 2.0))
        try:
            sock.recv(1)
        except socket.timeout:
            sock.settimeout(self.timeout)
            return
        except ssl.SSLError as e:
            raise ssl.SSLError("the server refused this client: %s" % (e.reason or e)) from None
        raise ConnectionResetError("the server closed the connection after the TLS handshake")

    def _drop_connection(self):
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def close(self):
        """Flush what is queued and close the connection."""
        try:
            self.flush()
        finally:
            self._drop_connection()


def run_test_client(address, public_key, secret_key, metric, interval, count=None, **tls):
    """Send one random value from 30 to 100 every ``interval`` s, each over a new connection."""
    sent = 0
    client = Client(address, public_key, secret_key, **tls)  # its TLS session lives on
    while count is None or sent < count:
        if sent:
            time.sleep(interval)
        value = random.randint(30, 100)
        client.send(metric, value)
        ok = client.flush()
        client.close()
        sent += 1
        log.info("sent a data point" if ok else "could not send a data point",
                 extra={"metric": metric, "value": value,
                        "server": format_address(_parse_address(address))})
