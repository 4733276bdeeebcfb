"""TLS for devices on untrusted networks: the listener's context and its connections.

The handshake runs in the worker's selector loop, never blocking: a client
that stalls halfway holds only its own connection, until the handshake
timeout closes it.  Only TLS 1.2 and newer are accepted.

A device that reconnects resumes its session on whichever worker takes it,
skipping the certificate's signature, the costly part of a handshake: with the
ticket a TLS 1.2 handshake carries, or (``--tls-session-tickets``) the one a
TLS 1.3 server sends after the handshake.  The latter is off by default: a
client that sends and closes without reading it has its connection reset by its
own kernel, and what it had not yet sent is lost.  OpenSSL makes a random ticket key for each
context; every context amproxy makes (each worker's, and again at each
certificate reload) is given instead the keys the master drew at start
(``session_ticket_keys``): they live in memory only, as long as the master, and
a restart draws new ones.  A ticket is good for OpenSSL's default session
lifetime, two hours.
"""

import ctypes
import logging
import os
import re
import ssl

from .errors import AmproxyError, CloseConnection
from .logs import ClosedConnectionLog

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0
# The first bytes of a TLS record carrying a handshake: a ClientHello on the plain port.
TLS_HANDSHAKE_RECORD = b"\x16\x03"


# OpenSSL's ticket keys: a 16-byte key name, a 32-byte HMAC key, a 32-byte AES key.
TICKET_KEYS_BYTES = 80
_SSL_CTRL_SET_TLSEXT_TICKET_KEYS = 59


def session_ticket_keys():
    """Ticket keys for every worker's contexts; drawn once, by the master."""
    return os.urandom(TICKET_KEYS_BYTES)


def _set_ticket_keys(context, keys):
    """Give ``context`` these ticket keys (SSL_CTX_set_tlsext_ticket_keys, which Python's
    ssl module does not offer); False where that cannot be done."""
    try:
        libssl = ctypes.CDLL(getattr(ssl._ssl, "__file__", None))  # and what it links
        ctrl = libssl.SSL_CTX_ctrl
    except (OSError, AttributeError):
        return False
    ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_char_p]
    ctrl.restype = ctypes.c_long
    # An SSLContext object holds its SSL_CTX pointer right after the object header.
    ssl_ctx = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
    return bool(ssl_ctx) and ctrl(ssl_ctx, _SSL_CTRL_SET_TLSEXT_TICKET_KEYS,
                                  len(keys), keys) == 1


def server_context(cert_file, key_file, client_ca=None, ticket_keys=None,
                   tls13_tickets=False):
    """The listener's context, its tickets under ``ticket_keys`` if given (TLS 1.3 ones
    only with ``tls13_tickets``); AmproxyError names the file that cannot be used."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # TLS 1.3: one ticket per handshake (a device keeps the last one it got), or none.
    context.num_tickets = 1 if ticket_keys and tls13_tickets else 0
    if ticket_keys and not _set_ticket_keys(context, ticket_keys):
        log.warning("cannot share TLS session tickets between workers here; a device "
                    "resumes its session only on the worker that issued its ticket")
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

    def __init__(self, options, clock, ticket_keys=None):
        """Without a TLS listener there is no context, but TLS sent to the plain port
        is still counted here."""
        self.options = options
        self.ticket_keys = ticket_keys
        super().__init__(log, clock)
        self.context = None
        if options.tls_addr:
            try:
                self.context = self._load()
            except AmproxyError as e:  # the files changed since the master checked them
                log.error("%s; this worker takes no TLS clients", e)

    def _load(self):
        options = self.options
        return server_context(options.tls_cert, options.tls_key, options.tls_client_ca,
                              self.ticket_keys, options.tls_session_tickets)

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
        except OSError:
            # Reset after some records: those are the client's last lines, kept; the
            # next read sees the reset.
            if not chunks:
                raise
        return b"".join(chunks)

