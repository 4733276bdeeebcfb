"""What became of each line a worker read: forwarded, rejected for a reason
(counted, logged within a budget per second, counted per key for the device
table and with --stats-per-key), or lost to an internal error (counted, a
traceback a second)."""

import logging
import time

from .devices import Rejections
from .logs import RejectionLog
from .protocol import (BAD_METRIC, BAD_SIGNATURE, BAD_VALUE, METRIC_NOT_ALLOWED, RATE_LIMITED,
                       REJECTION_REASONS, REPLAYED, SKEW)

log = logging.getLogger("amproxy.worker")  # the worker's log, where these always were

# Reasons found after the signature was checked: the line is the key's own.
SIGNED_REJECTIONS = frozenset((SKEW, BAD_METRIC, METRIC_NOT_ALLOWED, BAD_VALUE, RATE_LIMITED,
                               REPLAYED))


class DeviceTally:
    """What each key's lines became since the last record, handed to the device table
    shared by the workers once a second: no system call, no shared write per line.
    The key objects count their accepted lines; rejections are tallied here."""

    def __init__(self, table, worker):
        self.table = table  # devices.DeviceTable
        self.worker = worker
        self.rejected = {}  # public key -> devices.Rejections
        self._kept = {}  # what a key map replaced by a reload had counted

    def reject(self, public_key, reason, detail):
        """``detail``: for skew, how far ahead the line's clock is; for a bad signature,
        whether the key's previous (expired) secret signed it."""
        tally = self.rejected.get(public_key)
        if tally is None:
            tally = self.rejected[public_key] = Rejections()
        if reason == SKEW:
            tally.add(reason, time.time(), skew=detail)
        else:
            tally.add(reason, time.time(), old_secret=reason == BAD_SIGNATURE and bool(detail))

    def keep_counts(self, keys):
        """A reload is about to replace ``keys``: keep what its key objects counted (and
        no reference to them, which would keep the old snapshot mapped)."""
        for public_key, count in keys.take_counts().items():
            self._kept[public_key] = self._kept.get(public_key, 0) + count

    def record(self, clients, stats, keys):
        """To the table: the tallies, and the keys (of ``keys``, the auth file's) the
        worker's connections last sent, open (``clients.connections``) or closed since
        (``clients.departed``)."""
        accepted = keys.take_counts()
        for public_key, count in self._kept.items():
            if public_key in keys:  # a key revoked since has no state to add to
                accepted[public_key] = accepted.get(public_key, 0) + count
        self._kept = {}
        rejected = {key: tally for key, tally in self.rejected.items() if key in keys}
        if stats.forwarded_per_key is not None:  # --stats-per-key reports them too
            for public_key, count in accepted.items():
                stats.forwarded_per_key[public_key] = (
                    stats.forwarded_per_key.get(public_key, 0) + count)
        connected = {conn.key: (conn.source, conn.tls) for conn in clients.connections.values()
                     if conn.key is not None and conn.key in keys}
        to_epoch = time.time() - time.monotonic()
        departed = {key: (address, tls, last_line + to_epoch)
                    for key, (address, tls, last_line) in clients.departed.items()
                    if key in keys}
        self.table.record(self.worker, time.time(), accepted, rejected, connected, departed)
        self.rejected, clients.departed = {}, {}


class LineOutcomes:
    def __init__(self, log_rejections, stats, clock, devices):
        self.devices = devices  # DeviceTally
        self.forwarded = 0
        self.internal_errors = 0
        self.rejected = dict.fromkeys(REJECTION_REASONS, 0)
        self.log = RejectionLog(log, log_rejections, self.rejected)
        self.stats = stats  # stats.WorkerStats: the per-key counts, if kept
        self.clock = clock
        self._internal_error_logged_at = None

    def rejecter(self, conn, keys):
        """The callback that counts (and within the log budget, logs) a rejected line."""
        rejected = self.rejected
        budget = self.log.budget
        log_rejection = self.log.log
        rejected_per_key = self.stats.rejected_per_key
        devices = self.devices

        def reject(reason, public_key, metric, detail=None):
            rejected[reason] += 1
            if budget[reason]:
                budget[reason] -= 1
                log_rejection(reason, conn.remote, public_key, metric)
            if public_key in keys:
                devices.reject(public_key, reason, detail)
                if reason in SIGNED_REJECTIONS:  # its signature passed: it is that device
                    conn.key = public_key
                if rejected_per_key is not None:
                    rejected_per_key[public_key] = rejected_per_key.get(public_key, 0) + 1
        return reject

    def internal_error(self, conn, lines):
        """A bug cost these lines (called from an except block: its traceback is logged)."""
        self.internal_errors += lines
        now = self.clock()
        if self._internal_error_logged_at is None or now - self._internal_error_logged_at >= 1:
            self._internal_error_logged_at = now  # a traceback a second at most
            log.exception("unexpected error while checking a client's lines; they are "
                          "dropped", extra={"remote": conn.remote, "lines": lines})

    def counters(self):
        rejected = self.rejected
        counters = {"rejected." + reason: count for reason, count in rejected.items()}
        counters.update({
            "linesReceived": self.forwarded + sum(rejected.values()) + self.internal_errors,
            "linesForwarded": self.forwarded,
            "internalErrors": self.internal_errors})
        return counters
