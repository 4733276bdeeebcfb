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

The certificate files are read by the master alone (:class:`CertificateFiles`),
at start and on SIGHUP: only regular files, opened without blocking, checked by
loading them, and kept in sealed memfds.  Every worker loads that copy: those
running when a new pair passes the check are sent it, and one started later
inherits the last good pair, whatever the files hold by then.
"""

import ctypes
import fcntl
import logging
import os
import re
import ssl
import stat

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
                   tls13_tickets=False, names=None):
    """The listener's context, its tickets under ``ticket_keys`` if given (TLS 1.3 ones
    only with ``tls13_tickets``); AmproxyError names the file that cannot be used, by
    its name in ``names`` (cert, key, client CA) if given."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # TLS 1.3: one ticket per handshake (a device keeps the last one it got), or none.
    context.num_tickets = 1 if ticket_keys and tls13_tickets else 0
    if ticket_keys and not _set_ticket_keys(context, ticket_keys):
        log.warning("cannot share TLS session tickets between workers here; a device "
                    "resumes its session only on the worker that issued its ticket")
    paths = (cert_file, key_file, client_ca)
    _load_pair(context, paths, names or paths)
    if client_ca:
        _load_certificates(context, client_ca, (names or paths)[2], "TLS client CA file")
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _load_pair(context, paths, names):
    """The certificate chain and its key, or AmproxyError naming the file at fault."""
    # Its certificates alone first: whatever is wrong after that is the key's.
    _load_certificates(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), paths[0], names[0],
                       "TLS certificate file")
    try:
        context.load_cert_chain(paths[0], paths[1], password=_no_passphrase)
    except _EncryptedKey:
        raise AmproxyError("TLS key file %s is encrypted; amproxy needs it without a "
                           "passphrase" % names[1]) from None
    except ssl.SSLError as e:
        if e.reason == "KEY_VALUES_MISMATCH":
            raise AmproxyError("TLS key file %s does not belong to the certificate in %s" % (
                names[1], names[0])) from None
        raise AmproxyError("TLS key file %s holds no private key amproxy can read" % (
            names[1])) from None
    except OSError as e:
        raise AmproxyError("TLS certificate %s and key %s cannot be used: %s" % (
            names[0], names[1], _why(e))) from None


def _load_certificates(context, path, name, what):
    try:
        context.load_verify_locations(path)
    except ssl.SSLError as e:
        reason = "it holds no PEM certificate" if e.reason in (
            "NO_CERTIFICATE_OR_CRL_FOUND", None) else _why(e)
        raise AmproxyError("%s %s cannot be used: %s" % (what, name, reason)) from None
    except OSError as e:
        raise AmproxyError("%s %s cannot be used: %s" % (what, name, _why(e))) from None


class _EncryptedKey(Exception):
    pass


def _no_passphrase():
    """Asked for a key's passphrase: refuse, instead of OpenSSL's prompt on a terminal."""
    raise _EncryptedKey()


# -- the files, as the master read and checked them ----------------------------------

# A certificate chain, key or CA bundle larger than this is not one.
MAX_FILE_BYTES = 1 << 20
_FILE_KINDS = ("TLS certificate file", "TLS key file", "TLS client CA file")
_SEALS = (fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE)
_NOT_REGULAR = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a directory"),
                (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"),
                (stat.S_ISBLK, "a device"))


class CertificateFiles:
    """``--tls-cert``, ``--tls-key`` and ``--tls-client-ca`` as the master last read and
    checked them (``read``): a sealed memfd each, which never blocks and never changes.

    The master keeps the last good set; a worker forked later inherits it, and running
    workers are sent each new one (SCM_RIGHTS).  A process loads them by their
    ``/proc/self/fd`` names (``context``), since Python's ssl reads only paths; the
    operator's files are opened by the master alone, without blocking, and only if
    regular.
    """

    def __init__(self, names, fds, error=None):
        self.names = tuple(names)  # the operator's paths, for messages (None: no client CA)
        self.fds = list(fds)  # one per name (None where the name is None)
        self.error = error  # why none came (received without its files)

    @classmethod
    def read(cls, cert_file, key_file, client_ca=None):
        """Read and check the files now; AmproxyError names the one at fault."""
        names, fds = (cert_file, key_file, client_ca or None), []
        try:
            for name, what in zip(names, _FILE_KINDS):
                fds.append(None if name is None else _sealed(_read_regular(name, what),
                                                             name, what))
            files = cls(names, fds)
            files.context()
        except BaseException:
            for fd in fds:
                if fd is not None:
                    os.close(fd)
            raise
        return files

    @classmethod
    def received(cls, names, fds):
        """Files sent by the master: ``names`` and an fd for each that is not None."""
        fds = list(fds)
        if len(fds) != sum(name is not None for name in names):
            cls(names, fds).close()
            return cls(names, [], "the new TLS certificate could not be received")
        it = iter(fds)
        return cls(names, [None if name is None else next(it) for name in names])

    def sent(self):
        """The fds to send with ``names`` (see ``received``)."""
        return [fd for fd in self.fds if fd is not None]

    def context(self, ticket_keys=None, tls13_tickets=False):
        """A server context loaded from these files (see ``server_context``)."""
        if self.error is not None:
            raise AmproxyError(self.error)
        paths = [None if fd is None else "/proc/self/fd/%d" % fd for fd in self.fds]
        return server_context(*paths, ticket_keys=ticket_keys, tls13_tickets=tls13_tickets,
                              names=self.names)

    def close(self):
        for fd in self.fds:
            if fd is not None:
                os.close(fd)
        self.fds = [None] * len(self.fds)


class CertificateReloads:
    """The master's side: the last good certificate files, on the TLS listener (so a
    worker forked later loads them), read and checked again on SIGHUP (``reload``)
    and sent to the running workers (``channels()``: their SnapshotChannel)."""

    def __init__(self, listener, options, channels):
        """Reads the files: AmproxyError names the one at fault."""
        self.listener = listener
        self.options = options
        self._channels = channels
        listener.certificate = self._read()

    def _read(self):
        options = self.options
        return CertificateFiles.read(options.tls_cert, options.tls_key, options.tls_client_ca)

    def reload(self):
        """A good pair goes to every worker, and stays for those started later; else
        the last good pair stays, and the workers are not told."""
        try:
            files = self._read()
        except AmproxyError as e:
            log.error("TLS certificate not reloaded, keeping the one in use: %s", e)
            return
        for channel in self._channels():
            channel.send_certificate(files)
        self.listener.certificate.close()
        self.listener.certificate = files


def _read_regular(path, what):
    """The bytes of ``path``, which must be a regular file of at most MAX_FILE_BYTES;
    opened without blocking (a FIFO would block an open, a device its read)."""
    try:
        kind = _not_regular(os.stat(path).st_mode)  # refused without being opened
        if kind is None:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
            try:
                kind = _not_regular(os.fstat(fd).st_mode)  # replaced in between
                data = None if kind else _read_at_most(fd, MAX_FILE_BYTES + 1)
            finally:
                os.close(fd)
    except OSError as e:
        raise AmproxyError("%s %s cannot be read: %s" % (what, path, e.strerror or e)) from None
    if kind is not None:
        raise AmproxyError("%s %s is %s, not a regular file" % (what, path, kind))
    if len(data) > MAX_FILE_BYTES:
        raise AmproxyError("%s %s is larger than %d KiB" % (what, path, MAX_FILE_BYTES >> 10))
    return data


def _read_at_most(fd, limit):
    chunks, got = [], 0
    while got < limit:
        chunk = os.read(fd, limit - got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _not_regular(mode):
    """None for a regular file, else what it is ("a FIFO", ...)."""
    if stat.S_ISREG(mode):
        return None
    return next((kind for test, kind in _NOT_REGULAR if test(mode)), "a special file")


def _sealed(data, name, what):
    """``data`` in a sealed memfd: read-only from now on, for this process and its children."""
    try:
        fd = os.memfd_create("amproxy-tls", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    except OSError as e:
        raise AmproxyError("%s %s: no memory to load it into: %s" % (
            what, name, e.strerror or e)) from None
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
    except OSError as e:
        os.close(fd)
        raise AmproxyError("%s %s: no memory to load it into: %s" % (
            what, name, e.strerror or e)) from None
    return fd


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

    def __init__(self, options, clock, ticket_keys=None, files=None):
        """``files``: the :class:`CertificateFiles` the master last checked (inherited;
        closed once loaded).  Without a TLS listener there is no context, but TLS sent
        to the plain port is still counted here."""
        self.options = options
        self.ticket_keys = ticket_keys
        super().__init__(log, clock)
        self.context = None
        if options.tls_addr:
            try:
                self.context = self._load(files)
            except AmproxyError as e:  # the master checked them: not expected
                log.error("%s; this worker takes no TLS clients", e)

    def _load(self, files):
        if files is None:
            raise AmproxyError("no TLS certificate was handed to this worker")
        try:
            return files.context(self.ticket_keys, self.options.tls_session_tickets)
        finally:
            files.close()

    def take(self, files):
        """After a SIGHUP: certificate files the master checked (:class:`CertificateFiles`,
        closed once loaded), used from now on; if they cannot be, the old stay."""
        try:
            self.context = self._load(files)
        except AmproxyError as e:
            log.error("TLS certificate not reloaded, keeping the one in use: %s", e)
            return
        log.info("TLS certificate reloaded", extra={"tls_cert": files.names[0]})

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

