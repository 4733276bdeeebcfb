"""The master's workers: how many it wants, forking them, and signalling them.

The master reaps them (it knows what else a dead child may be) and watches
their heartbeats; this pool keeps the count, the slots and the ages, and
forks with the signals blocked so that none reaches the master's handlers in
the child.
"""

import logging
import os
import signal
import time

from .links import SIGNALS

log = logging.getLogger("amproxy.master")  # the master's log, as before the move


class WorkerPool:
    """``workers``: pid -> Worker.  ``make(slot, age)`` builds a worker (before the
    fork); ``run(worker, signal_mask)`` is the child's life, returning its exit status."""

    def __init__(self, count, make, run):
        self.count = count
        self.workers = {}
        self._make = make
        self._run = run
        self._age = 0

    def manage(self):
        """Start workers up to ``count``; ask the oldest beyond it to stop."""
        while len(self.workers) < self.count:
            self.spawn()
        if len(self.workers) > self.count:
            oldest = sorted(self.workers.items(), key=lambda item: item[1].age)
            for pid, _ in oldest[:len(self.workers) - self.count]:
                self.kill(pid, signal.SIGTERM)

    def spawn(self):
        self._age += 1
        used = {w.slot for w in self.workers.values()}
        slot = min(set(range(len(self.workers) + 1)) - used)
        worker = self._make(slot, self._age)
        # Signals stay blocked across the fork until the child has its own
        # handlers, so none is lost to the master's handler in the child.
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        pid = os.fork()
        if pid:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            worker.auth_channel.close_worker_end()
            self.workers[pid] = worker
            log.debug("worker started", extra={"worker_pid": pid, "slot": slot})
            return pid
        os._exit(self._run(worker, old_mask))

    def murder(self, timeout):
        """Kill workers whose heartbeat stopped ``timeout`` seconds ago: they are hung."""
        if not timeout:
            return
        now = time.time()
        for pid, worker in list(self.workers.items()):
            try:
                silent = now - worker.heartbeat.last_update()
            except OSError:
                continue
            if silent > timeout:
                log.error("worker hung (no heartbeat for %.0f s); killing it", silent,
                          extra={"worker_pid": pid})
                self.kill(pid, signal.SIGKILL)

    def kill_all(self, sig):
        for pid in list(self.workers):
            self.kill(pid, sig)

    @staticmethod
    def kill(pid, sig):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
