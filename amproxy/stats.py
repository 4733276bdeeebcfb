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

from .protocol import REJECTION_REASONS

log = logging.getLogger(__name__)

COUNTERS = (("linesReceived", "linesForwarded")
            + tuple("rejected." + reason for reason in REJECTION_REASONS)
            + ("connectionsOpened", "connectionsRefused", "carbonReconnects",
               "droppedLines", "deadLetters", "internalErrors", "authReloads",
               "authReloadErrors"))
GAUGES = ("activeConnections", "bufferedLines", "spooledBytes")
MAX_DATAGRAM = 60000
# The per-key counts in one datagram; the rest of MAX_DATAGRAM holds the envelope.
KEYS_PER_DATAGRAM_BYTES = MAX_DATAGRAM - 1000


def default_prefix():
    return "amproxy." + socket.gethostname().replace(".", "_")


_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def metric_node(text):
    """A public key as one safe Graphite node (no dots or odd characters)."""
    return _UNSAFE.sub("_", text)


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
        deltas = {name: current[name] - self._reported[name] for name in COUNTERS}
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

    def __init__(self, channels, prefix, per_key):
        self.channels = channels
        self.prefix = prefix
        self.per_key = per_key
        self.totals = dict.fromkeys(COUNTERS, 0)
        self.interval = dict.fromkeys(COUNTERS, 0)
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
                if name in self.totals:
                    self.totals[name] += value
                    self.interval[name] += value
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
                if name in summed:
                    summed[name] += value
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

    def flush(self, workers, timestamp):
        """Send this interval's metrics to Carbon through a worker; start a new interval."""
        self.drain()
        values = dict(self.interval)
        values.update(self.current_gauges(workers))
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
        self.interval = dict.fromkeys(COUNTERS, 0)
        self.key_interval = {}

    def send_pending(self):
        """Hand what the workers have room for to them; the rest waits (``pending``)."""
        while self.pending:
            try:
                self.channels.outbox_in.send(self.pending[0])
            except (BlockingIOError, InterruptedError):
                return
            self.pending.pop(0)
