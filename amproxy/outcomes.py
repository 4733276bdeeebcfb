"""What became of each line a worker read: forwarded, rejected for a reason
(counted, logged within a budget per second, counted per key with
--stats-per-key), or lost to an internal error (counted, a traceback a second)."""

import logging

from .logs import RejectionLog
from .protocol import REJECTION_REASONS

log = logging.getLogger("amproxy.worker")  # the worker's log, where these always were


class LineOutcomes:
    def __init__(self, log_rejections, stats, clock):
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

        def reject(reason, public_key, metric):
            rejected[reason] += 1
            if budget[reason]:
                budget[reason] -= 1
                log_rejection(reason, conn.remote, public_key, metric)
            if rejected_per_key is not None and public_key in keys:
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
