"""Self-metrics, the Graphite way: counters per interval under a prefix.

Workers keep plain integer counters (no lock, no syscall per line) and
report the change once a second to the master: the global counters and
gauges in one datagram, then any per-key counts in as many more as they
need.  The master adds them up, and every ``--stats-interval`` hands the
lines to a worker, which sends them to Carbon like any forwarded line.
"""

import json
import logging
import os
import re
import socket
import time

from .errors import AmproxyError
from .links import StatsChannels

from .protocol import REJECTION_REASONS

log = logging.getLogger(__name__)

COUNTERS = (("linesReceived", "linesForwarded")
            + tuple("rejected." + reason for reason in REJECTION_REASONS)
            + ("connectionsOpened", "connectionsRefused", "maxConnectionsReached",
               "proxyHeaderErrors", "tlsHandshakeErrors",
               "carbonReconnects",
               "droppedLines", "deadLetters", "internalErrors", "authReloads",
               "authReloadErrors"))
GAUGES = ("activeConnections", "bufferedLines", "spooledBytes")
# Counters and gauges of each Carbon destination are named under this node.
PER_DESTINATION = "destinations."
MAX_DATAGRAM = 60000
# How long the stats socket waits for a request (`amproxy stats` sends none), and
# the longest one it reads.
REQUEST_WAIT = 0.2
MAX_REQUEST_BYTES = 65536
# The per-key counts in one datagram; the rest of MAX_DATAGRAM holds the envelope.
KEYS_PER_DATAGRAM_BYTES = MAX_DATAGRAM - 1000


def default_prefix():
    return "amproxy." + socket.gethostname().replace(".", "_")


_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def metric_node(text):
    """A public key as one safe Graphite node (no dots or odd characters)."""
    return _UNSAFE.sub("_", text)


def destination_node(destination):
    """Where a Carbon destination's own metrics go: ``destinations.127_0_0_1_2003_a``."""
    return PER_DESTINATION + metric_node(str(destination))


# Per destination: counters, then gauges, each under destination_node().
DESTINATION_COUNTERS = ("linesSent", "carbonReconnects")
DESTINATION_GAUGES = ("bufferedLines", "spooledBytes")


def datagrams(lines):
    """Whole lines (bytes) joined into datagrams of at most MAX_DATAGRAM bytes."""
    chunk, size = [], 0
    for line in lines:
        if size + len(line) > MAX_DATAGRAM and chunk:
            yield b"".join(chunk)
            chunk, size = [], 0
        chunk.append(line)
        size += len(line)
    if chunk:
        yield b"".join(chunk)


# Intervals of self-metrics the master keeps while no worker takes them.
MAX_PENDING_DATAGRAMS = 1000


class WorkerStats:
    """A worker's side: what changed since the last report that got through."""

    def __init__(self, channels, per_key):
        self.sock = channels.reports_out
        self.per_key = per_key
        self._reported = dict.fromkeys(COUNTERS, 0)
        self.forwarded_per_key = {} if per_key else None
        self.rejected_per_key = {} if per_key else None
        self._warned = False

    def report(self, counters, gauges):
        """Send what changed; True if all of it went out.

        Whatever was not sent stays counted here and goes with the next
        report, so nothing is lost and nothing is counted twice.
        """
        pid = os.getpid()
        # .get: a worker that does not count a newer counter yet reports 0.
        current = {name: counters.get(name, 0) for name in COUNTERS}
        current.update((name, value) for name, value in counters.items()
                       if name.startswith(PER_DESTINATION))
        deltas = {name: value - self._reported.get(name, 0) for name, value in current.items()}
        totals = {"pid": pid, "counters": {k: v for k, v in deltas.items() if v},
                  "gauges": gauges}
        if not self._send(totals):
            return False
        self._reported = current
        if self.per_key:
            for counts, keys in self._key_counts_in_chunks():
                if not self._send({"pid": pid, "keys": counts}):
                    return False
                for key in keys:
                    self.forwarded_per_key.pop(key, None)
                    self.rejected_per_key.pop(key, None)
        return True

    def _key_counts_in_chunks(self):
        """The per-key counts, in parts that each fit one datagram, with the keys each covers.

        Sized by the JSON text itself: keys can be long and any UTF-8.  A key
        sent and counted again goes back at the end of its dict, so keys a
        cut-short report left behind tend to go first next time.
        """
        counts, keys, size = {}, [], 0
        for key in dict.fromkeys([*self.forwarded_per_key, *self.rejected_per_key]):
            name = key.decode("utf-8", "replace")
            forwarded = self.forwarded_per_key.get(key, 0)
            rejected = self.rejected_per_key.get(key, 0)
            # '"name": [f, r], ' as json.dumps writes it (ASCII: non-ASCII is escaped)
            entry_size = len(json.dumps(name)) + len("%d%d" % (forwarded, rejected)) + 8
            if counts and size + entry_size > KEYS_PER_DATAGRAM_BYTES:
                yield counts, keys
                counts, keys, size = {}, [], 0
            previous = counts.get(name, (0, 0))  # two keys that decode alike
            counts[name] = [previous[0] + forwarded, previous[1] + rejected]
            keys.append(key)
            size += entry_size
        if counts:
            yield counts, keys

    def _send(self, message):
        """One datagram to the master; False if it was not sent."""
        try:
            self.sock.send(json.dumps(message).encode())
        except (BlockingIOError, InterruptedError):
            return False  # the master is busy: the next report carries these too
        except OSError as e:
            # Once a second for ever would flood the log; once says what broke.
            level = logging.DEBUG if self._warned else logging.WARNING
            self._warned = True
            log.log(level, "stats report not sent (self-metrics wait for the next): %s", e)
            return False
        return True


class StatsCollector:
    """The master's side: totals since start, and the current interval."""

    def __init__(self, channels, prefix, per_key, destinations=()):
        self.channels = channels
        self.prefix = prefix
        self.per_key = per_key
        # Every destination's counters from the start, so that they graph as 0, not nothing.
        self.totals = dict.fromkeys(COUNTERS + tuple(
            "%s.%s" % (destination_node(d), name)
            for d in destinations for name in DESTINATION_COUNTERS), 0)
        self.interval = dict.fromkeys(self.totals, 0)
        self.gauges = {}  # worker pid -> its latest gauges
        self.key_totals = {}
        self.key_interval = {}
        self.pending = []  # datagrams of lines for Carbon that no worker took yet

    def drain(self):
        """Take every report that is waiting."""
        while True:
            try:
                data = self.channels.reports_in.recv(1 << 20)
            except (BlockingIOError, InterruptedError):
                return
            try:
                report = json.loads(data)
            except ValueError:
                continue
            for name, value in report.get("counters", {}).items():
                if name in self.totals or name.startswith(PER_DESTINATION):
                    self.totals[name] = self.totals.get(name, 0) + value
                    self.interval[name] = self.interval.get(name, 0) + value
            if "gauges" in report:  # a datagram of per-key counts carries none
                self.gauges[report.get("pid")] = report["gauges"]
            for key, (forwarded, rejected) in report.get("keys", {}).items():
                for table in (self.key_totals, self.key_interval):
                    counts = table.setdefault(key, [0, 0])
                    counts[0] += forwarded
                    counts[1] += rejected

    def forget_worker(self, pid):
        self.gauges.pop(pid, None)

    def current_gauges(self, workers):
        summed = dict.fromkeys(GAUGES, 0)
        for pid in workers:
            for name, value in self.gauges.get(pid, {}).items():
                if name in summed or name.startswith(PER_DESTINATION):
                    summed[name] = summed.get(name, 0) + value
        summed["workers"] = len(workers)
        return summed

    def snapshot(self, workers):
        """Totals since start, for ``amproxy stats``."""
        self.drain()
        data = {"prefix": self.prefix, "totals": dict(self.totals),
                "gauges": self.current_gauges(workers)}
        if self.per_key:
            data["keys"] = {key: {"linesForwarded": f, "rejected": r}
                            for key, (f, r) in sorted(self.key_totals.items())}
        return data

    def flush(self, workers, timestamp, extra=()):
        """Send this interval's metrics (and the ``extra`` gauges) to Carbon through a
        worker; start a new interval."""
        self.drain()
        values = dict(self.interval)
        values.update(self.current_gauges(workers))
        values.update(extra)
        lines = ["%s.%s %d %d\n" % (self.prefix, name, value, timestamp)
                 for name, value in values.items()]
        if self.per_key:
            for key, (forwarded, rejected) in sorted(self.key_interval.items()):
                node = "%s.keys.%s" % (self.prefix, metric_node(key))
                lines.append("%s.linesForwarded %d %d\n" % (node, forwarded, timestamp))
                lines.append("%s.rejected %d %d\n" % (node, rejected, timestamp))
        self.pending.extend(datagrams([line.encode() for line in lines]))
        if len(self.pending) > MAX_PENDING_DATAGRAMS:
            del self.pending[:len(self.pending) - MAX_PENDING_DATAGRAMS]
            log.warning("self-metrics dropped: no worker has taken them for a long time")
        self.send_pending()
        self.interval = dict.fromkeys(self.totals, 0)  # 0 for every counter seen
        self.key_interval = {}

    def send_pending(self):
        """Hand what the workers have room for to them; the rest waits (``pending``)."""
        while self.pending:
            try:
                self.channels.outbox_in.send(self.pending[0])
            except (BlockingIOError, InterruptedError):
                return
            self.pending.pop(0)


class PendingRequests:
    """Connections to the stats socket whose request is not read yet, read as the
    master's loop finds them readable (a silent client holds nothing up).
    ``amproxy devices`` sends one line; ``amproxy stats`` sends nothing (and an
    older one does not even end its stream), so a request ends at a newline, at
    the end of the stream, or after ``REQUEST_WAIT``."""

    def __init__(self):
        self.conns = {}  # socket -> (what it sent so far, when to stop waiting)

    def add(self, conn):
        conn.setblocking(False)
        self.conns[conn] = (b"", time.monotonic() + REQUEST_WAIT)

    def readable(self):
        return list(self.conns)

    def timeout(self, timeout):
        if not self.conns:
            return timeout
        return max(0.0, min([timeout] + [at - time.monotonic() for _, at in self.conns.values()]))

    def complete(self, ready):
        """The (connection, request) pairs that are complete now (b"": none)."""
        now = time.monotonic()
        done = []
        for conn, (data, deadline) in list(self.conns.items()):
            ended = False
            if conn in ready:
                try:
                    chunk = conn.recv(MAX_REQUEST_BYTES + 1 - len(data))
                except (BlockingIOError, InterruptedError):
                    chunk = None
                except OSError:
                    chunk = b""
                data += chunk or b""
                ended = chunk == b"" or b"\n" in data or len(data) > MAX_REQUEST_BYTES
            if ended or now >= deadline:
                del self.conns[conn]
                done.append((conn, data))
            else:
                self.conns[conn] = (data, deadline)
        return done


def _answers(path):
    """Whether a server listens on Unix socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1)
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


class StatsService:
    """The master's share of self-metrics, in one place.

    It collects the workers' reports, answers ``amproxy stats`` on a Unix
    socket, and every ``--stats-interval`` (read live from ``options``) hands
    an interval's metrics to a worker.  The master only waits on its
    descriptors and calls back.
    """

    def __init__(self, options, socket_path, replacing=False, devices=None):
        """``replacing``: a master started by SIGUSR2 listens beside the old master's
        socket, and takes its path (``claim_path``) only once it has taken over."""
        self.options = options
        self.devices = devices  # devicequery.DeviceQueries: `amproxy devices`, devices.*
        self.requests = PendingRequests()
        self.channels = StatsChannels()
        self.collector = StatsCollector(self.channels, options.stats_prefix or
                                        default_prefix(), options.stats_per_key,
                                        options.carbon_addr)
        self._path = socket_path
        self._bound_path = "%s.%d" % (socket_path, os.getpid()) if replacing else socket_path
        self.listener = self._listen(self._bound_path, replacing) if socket_path else None
        # The file this listener made, so that it never removes another's.
        self._socket_inode = os.stat(self._bound_path).st_ino if socket_path else None
        self._next_flush = None

    @staticmethod
    def _listen(path, replacing):
        try:
            if os.path.exists(path) and not replacing:
                if _answers(path):
                    raise AmproxyError("stats socket %s belongs to a running amproxy; give "
                                       "this one another --stats-socket (a test instance: "
                                       "--config /dev/null)" % path)
                os.unlink(path)  # left by a run that is gone
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(path)
            os.chmod(path, 0o660)
            sock.listen(8)
        except OSError as e:
            raise AmproxyError("cannot listen on stats socket %s: %s" % (
                path, e.strerror or e)) from None
        sock.setblocking(False)
        return sock

    def claim_path(self):
        """Taking over from the old master: the stats socket's path is now this one's."""
        if self.listener is not None and self._bound_path != self._path:
            try:
                os.rename(self._bound_path, self._path)
            except OSError as e:
                raise AmproxyError("cannot take over stats socket %s: %s" % (
                    self._path, e.strerror or e)) from None
            self._bound_path = self._path

    def readable(self):
        """Descriptors to watch for reading."""
        fds = [self.channels.reports_in] + self.requests.readable()
        return fds + [self.listener] if self.listener is not None else fds

    def writable(self):
        """Self-metrics the workers had no room for go as soon as there is."""
        return [self.channels.outbox_in] if self.collector.pending else []

    def timeout(self, timeout):
        """``timeout``, or less if an interval ends (or a request's wait does) sooner."""
        timeout = self.requests.timeout(timeout)
        if self.options.stats_interval and self._next_flush is not None:
            return max(0.0, min(timeout, self._next_flush - time.monotonic()))
        return timeout

    def on_ready(self, ready, writable, workers):
        if writable:
            self.collector.send_pending()
        if self.channels.reports_in in ready:
            self.collector.drain()
        if self.listener is not None and self.listener in ready:
            self._accept()
        for conn, request in self.requests.complete(ready):
            self._answer(conn, request, workers)

    def _accept(self):
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        self.requests.add(conn)

    def _answer(self, conn, request, workers):
        with conn:
            if request.startswith(b"devices") and self.devices is not None and \
                    len(request) <= MAX_REQUEST_BYTES:
                self.devices.answer(conn, request, self.options.device_silent_after)
                return
            conn.settimeout(2)
            try:
                conn.sendall(json.dumps(self.collector.snapshot(workers)).encode())
            except OSError:
                pass

    def tick(self, workers):
        """Send the interval's metrics if it has ended (and stop overdue queries)."""
        if self.devices is not None:
            self.devices.kill_overdue()
        interval = self.options.stats_interval
        if not interval:
            return
        now = time.monotonic()
        if self._next_flush is None:
            self._next_flush = now + interval
        elif now >= self._next_flush:
            self._next_flush = now + interval
            extra = self.devices.gauges(interval, self.options.device_silent_after) \
                if self.devices is not None else {}
            self.collector.flush(workers, int(time.time()), extra)

    def forget_worker(self, pid):
        """The master reaped ``pid``: a worker, or a child answering a devices query."""
        self.collector.forget_worker(pid)
        if self.devices is not None:
            self.devices.reaped(pid)

    def close_in_worker(self):
        """In a forked worker: keep only the worker's ends of the channels."""
        self.channels.reports_in.close()
        self.channels.outbox_in.close()
        for conn in self.requests.readable():
            conn.close()
        if self.listener is not None:
            self.listener.close()

    def close(self):
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            try:
                if os.stat(self._bound_path).st_ino == self._socket_inode:
                    os.unlink(self._bound_path)
            except OSError:
                pass
