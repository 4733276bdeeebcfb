"""TLS for devices on untrusted networks: the listener's context and its connections.

The handshake runs in the worker's selector loop, never blocking: a client
that stalls halfway holds only its own connection, until the handshake
timeout closes it.  amproxy never writes to a client, so the server sends no
session tickets (nothing to write after the handshake).  Only TLS 1.2 and
newer are accepted.
"""

import logging
import re
import ssl

from .errors import AmproxyError, CloseConnection
from .logs import ClosedConnectionLog

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0
# The first bytes of a TLS record carrying a handshake: a ClientHello on the plain port.
TLS_HANDSHAKE_RECORD = b"\x16\x03"


def server_context(cert_file, key_file, client_ca=None):
    """The listener's context; AmproxyError names the file that cannot be used."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.num_tickets = 0
    try:
        context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as e:
        raise AmproxyError("TLS certificate %s and key %s cannot be used: %s" % (
            cert_file, key_file, _why(e))) from None
    if client_ca:
        try:
            context.load_verify_locations(client_ca)
        except (OSError, ssl.SSLError) as e:
            raise AmproxyError("TLS client CA file %s cannot be used: %s" % (
                client_ca, _why(e))) from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


_REASONS = {
    "PEM_LIB": "no PEM certificate or key where one is expected (or the key is missing)",
    "KEY_VALUES_MISMATCH": "the key does not belong to the certificate",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the client refused this server's certificate",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "the client sent no certificate",
}


def _why(error):
    """An OSError's or SSLError's reason, without the C source location."""
    if isinstance(error, ssl.SSLError) and error.reason:
        return _REASONS.get(error.reason, error.reason)  # WRONG_VERSION_NUMBER, ...
    return re.sub(r" \(_ssl\.c:\d+\)", "", getattr(error, "strerror", None) or str(error))


def client_context(ca_file=None, cert_file=None, key_file=None):
    """For devices: verify the server (against ``ca_file``, else the system's CAs)."""
    context = ssl.create_default_context(cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file:
        context.load_cert_chain(cert_file, key_file)
    return context


class TlsConnections(ClosedConnectionLog):
    """A worker's TLS side: its context, the handshakes under way, and their failures."""

    def __init__(self, options, clock):
        """Without a TLS listener there is no context, but TLS sent to the plain port
        is still counted here."""
        self.options = options
        super().__init__(log, clock)
        self.context = None
        if options.tls_addr:
            try:
                self.context = self._load()
            except AmproxyError as e:  # the files changed since the master checked them
                log.error("%s; this worker takes no TLS clients", e)

    def _load(self):
        options = self.options
        return server_context(options.tls_cert, options.tls_key, options.tls_client_ca)

    def reload(self):
        """On SIGHUP: the certificate may have been renewed.  A bad new pair keeps the old."""
        if not self.options.tls_addr:
            return
        try:
            self.context = self._load()
        except AmproxyError as e:
            log.error("TLS certificate not reloaded; keeping the one in use",
                      extra={"error": str(e)})
            return
        log.info("TLS certificate reloaded", extra={"tls_cert": self.options.tls_cert})

    def wrap(self, sock):
        return self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)

    def handshake(self, conn):
        """Go on with ``conn``'s handshake; the events to wait for next, or None once done.

        Raises CloseConnection when it failed (counted and logged).
        """
        try:
            conn.sock.do_handshake()
        except ssl.SSLWantReadError:
            return "read"
        except ssl.SSLWantWriteError:
            return "write"
        except (ssl.SSLError, OSError) as e:
            self.error(conn, "TLS handshake failed: %s" % _why(e))
            raise CloseConnection() from None
        return None

    def recv(self, conn, size):
        """Read what arrived, with what TLS already decrypted.

        Raises BlockingIOError when nothing is whole yet, and CloseConnection
        on a TLS error (a truncated or forged record).
        """
        sock = conn.sock
        chunks, got = [], 0
        try:
            # A record at a time (16 KB at most): read on until nothing whole is left,
            # as a plain recv() takes all that arrived.
            while got < size:
                chunk = sock.recv(size - got)
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            if not chunks:
                raise BlockingIOError() from None  # a record not yet whole: as for a plain socket
        except ssl.SSLError as e:
            self.error(conn, "TLS error: %s" % _why(e))
            raise CloseConnection() from None
        return b"".join(chunks)

