"""The links between the master and its workers, made by the master before it forks.

- the signals the master handles (and a child it forks must not);
- each worker's heartbeat, which the master watches;
- the live options, as the master last parsed them, with a generation;
- each worker's channel for auth snapshots and TLS certificate files;
- the self-metrics channels, both ways.
"""

import fcntl
import json
import logging
import os
import signal
import socket
import struct
import tempfile

from .config import LIVE_OPTIONS
from .tls import CertificateFiles

log = logging.getLogger(__name__)

# The master's signals: a worker forwards HUP to it; a child it forks resets them all.
SIGNALS = [getattr(signal, "SIG%s" % name) for name in
           "HUP QUIT INT TERM TTIN TTOU USR1 USR2 CHLD".split()]
SIGNAL_NAMES = {sig: sig.name[3:].lower() for sig in SIGNALS}


# What an admin sends every process of the service (systemctl kill, pkill) to reload,
# reopen logs, change the workers or upgrade: by default these stop (TTIN, TTOU) or
# end a process; a child that does not exec ignores them.
NOT_FOR_A_CHILD = [getattr(signal, "SIG%s" % name)
                   for name in "HUP TTIN TTOU USR1 USR2".split()]


def fork_plain_child(ignore=()):
    """``os.fork()`` for a child that is not a worker: it starts with default handlers
    (none for the signals in ``ignore``).

    The signals stay blocked across the fork until then, so that one sent to the child
    at once takes its own action instead of reaching the master's handler in the
    child, where it would be lost (a stop sent to a new master before its exec was)."""
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        pid = os.fork()
        if pid == 0:
            for sig in SIGNALS:
                signal.signal(sig, signal.SIG_IGN if sig in ignore else signal.SIG_DFL)
        return pid
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


class SignalQueue:
    """Signals a process handles in its loop, not in the handler: the handler queues
    the signal (at most ``limit`` waiting) and wakes the loop through a pipe, which
    the loop watches (``fileno``) and then ``drain``s."""

    def __init__(self, signals, limit=None):
        self._read_end, self._write_end = nonblocking_pipe()
        self.limit = limit
        self.pending = []
        for sig in signals:
            signal.signal(sig, self.record)

    def record(self, signum, frame=None):
        if self.limit is None or len(self.pending) < self.limit:
            self.pending.append(signum)
        try:
            os.write(self._write_end, b".")
        except OSError:
            pass  # the pipe is full: the loop wakes anyway

    def fileno(self):
        return self._read_end

    def drain(self, mask=None):
        """Empty the pipe (the signals themselves stay in ``pending``)."""
        drain(self._read_end)

    def take(self):
        """The signals received, oldest first, and none pending any more."""
        taken, self.pending = self.pending, []
        return taken

    def close(self):
        os.close(self._read_end)
        os.close(self._write_end)


class BootReports:
    """Each worker writes its pid here once it is up (``report``); the master reads
    them (``read``, when ``fileno`` is readable) into ``booted``."""

    _PID = struct.Struct("=i")

    def __init__(self):
        self._read_end, self._write_end = nonblocking_pipe()
        self.booted = set()

    def fileno(self):
        return self._read_end

    def report(self):
        """In a worker, once it is up."""
        os.write(self._write_end, self._PID.pack(os.getpid()))
        os.close(self._write_end)

    def close_in_worker(self):
        os.close(self._read_end)

    def read(self):
        data = drain(self._read_end)
        for (pid,) in self._PID.iter_unpack(data[:len(data) - len(data) % self._PID.size]):
            self.booted.add(pid)


def nonblocking_pipe():
    pipe = os.pipe()
    for fd in pipe:
        os.set_blocking(fd, False)
    return pipe


def drain(fd):
    """What a non-blocking pipe holds now."""
    chunks = []
    try:
        while True:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            chunks.append(chunk)
    except (BlockingIOError, InterruptedError):
        pass
    return b"".join(chunks)


class Heartbeat:
    """An unlinked temp file whose mtime the worker refreshes; the master watches it."""

    def __init__(self, directory=None):
        fd, name = tempfile.mkstemp(prefix="amproxy-worker-", dir=directory)
        os.unlink(name)
        self.fd = fd

    def notify(self):
        os.utime(self.fd)

    def last_update(self):
        return os.fstat(self.fd).st_mtime

    def close(self):
        os.close(self.fd)


class LiveOptions:
    """The live options as the master last parsed them, for its workers to take on SIGHUP.

    An unlinked file made before the workers are forked: the config is parsed
    once, by the master, and a bad one is logged once.  Each SIGHUP publishes it
    anew with the next ``generation``: a worker that has not applied that one
    yet reads the options again at its next auth update, whatever that update's
    reason (two reloads may reach it as one).  (The TLS certificate comes on the
    auth channel itself: see tls.CertificateReloads.)
    """

    def __init__(self):
        fd, name = tempfile.mkstemp(prefix="amproxy-options-")
        os.unlink(name)
        self.fd = fd
        self.generation = 0

    def publish(self, options):
        self.generation += 1
        values = {name: getattr(options, name) for name in LIVE_OPTIONS}
        data = json.dumps(dict(values, generation=self.generation)).encode()
        # A record lock (per process, unlike flock on a shared descriptor): a
        # worker still reading the previous version never sees half of this one.
        fcntl.lockf(self.fd, fcntl.LOCK_EX)
        try:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, data, 0)
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def read(self):
        """{option name: value, "generation": n}; empty before the first publish."""
        fcntl.lockf(self.fd, fcntl.LOCK_SH)
        try:
            data = os.pread(self.fd, os.fstat(self.fd).st_size, 0)
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)
        return json.loads(data) if data else {}


class Update:
    """A new snapshot (``fd``) or the reason the file was refused (``error``);
    ``retry``: the file itself was not judged (the compiling process failed)."""

    def __init__(self, reason, fd=None, error=None, retry=False):
        self.reason = reason
        self.fd = fd
        self.error = error
        self.retry = retry

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class SnapshotChannel:
    """Carries updates from the master to one worker (auth snapshots, and TLS
    certificate files after a SIGHUP), and the worker's requests for one (a SIGHUP
    sent to the worker itself): a datagram socket pair."""

    def __init__(self):
        self.master_end, self.worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.master_end.setblocking(False)
        self.worker_end.setblocking(False)

    def send(self, update):
        message = json.dumps({"reason": update.reason, "error": update.error}).encode()
        try:
            socket.send_fds(self.master_end, [message], [] if update.fd is None else [update.fd])
        except OSError as e:  # a hung worker's queue is full; it is replaced soon
            log.warning("a worker did not take the new auth file: %s", e.strerror or e)

    def send_certificate(self, files):
        """TLS certificate files the master checked (tls.CertificateFiles), to use now."""
        message = json.dumps({"certificate": files.names}).encode()
        try:
            socket.send_fds(self.master_end, [message], files.sent())
        except OSError as e:  # a hung worker's queue is full; it is replaced soon
            log.warning("a worker did not take the new TLS certificate: %s", e.strerror or e)

    def request_update(self):
        try:
            self.worker_end.send(b"reload")
        except OSError:
            pass  # one is already queued

    def update_requested(self):
        """In the master: whether the worker asked for an update (since the last call)."""
        asked = False
        while True:
            try:
                asked = self.master_end.recv(64) != b"" or asked
            except (BlockingIOError, InterruptedError):
                return asked

    def receive(self):
        """The updates waiting, oldest first: :class:`Update` for the auth file, and
        tls.CertificateFiles for the TLS certificate."""
        updates = []
        while True:
            try:
                message, fds, _, _ = socket.recv_fds(self.worker_end, 65536, 3)
            except (BlockingIOError, InterruptedError):
                return updates
            fields = json.loads(message)
            if "certificate" in fields:
                updates.append(CertificateFiles.received(fields["certificate"], fds))
                continue
            if not fds and fields["error"] is None:
                fields["error"] = "the new auth file could not be received"
            updates.append(Update(fields["reason"], fds[0] if fds else None, fields["error"]))

    def close_worker_end(self):
        self.worker_end.close()

    def close_master_end(self):
        self.master_end.close()



def _datagram_pair():
    pair = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    for sock in pair:
        sock.setblocking(False)
    return pair


class StatsChannels:
    """The two datagram channels, made by the master before it forks workers."""

    def __init__(self):
        self.reports_in, self.reports_out = _datagram_pair()  # workers -> master
        self.outbox_in, self.outbox_out = _datagram_pair()    # master -> a worker
