"""A worker process: accept clients, verify their lines, forward them to Carbon.

One thread, one selector: the shared listening socket, the client
connections, the Carbon connection and a wakeup pipe for signals.
"""

import logging
import os
import selectors
import signal
import time

from .config import LIVE_OPTIONS
from .clients import Clients
from .connections import HANDSHAKE, HEADER
from .destinations import Destinations
from .links import SIGNALS, SignalQueue
from .outcomes import DeviceTally, LineOutcomes
from .errors import CloseConnection
from .listeners import Acceptor, connection_limit
from .logs import reopen_log_files, set_level
from .ratelimit import RateLimiter
from .tls import CertificateFiles, TlsConnections
from .protocol import LINE_TOO_LONG, MALFORMED, filter_lines
from .stats import WorkerStats

log = logging.getLogger(__name__)

RECV_SIZE = 256 * 1024
TICK = 0.5  # the longest the loop sleeps, so it notices a dead master quickly
STATS_REPORT_INTERVAL = 1.0
# The longest lines accepted wait before they are written to Carbon while the loop
# is busy; an idle loop writes at once.
FLUSH_INTERVAL = 0.001
# Exit status of a worker that could not start; the master stops instead of
# respawning it forever.
WORKER_BOOT_ERROR = 3
# When the master dies there is no one to wait for: leave quickly.
ORPHAN_STOP_SECONDS = 1.0
# On a graceful stop, how long a client may take to finish a half-sent line, and a
# plain client to close its side once told the stream ends.
PARTIAL_LINE_GRACE = 1.0
# How often a worker looks for spools other workers left as they stopped (those of
# the master an upgrade replaced stop after this worker started).
SPOOL_ADOPTION_INTERVAL = 5.0
# On a graceful stop, the longest wait between attempts to reach Carbon.
STOPPING_MAX_BACKOFF = 1.0


class Worker:
    """Built by the master before the fork; ``run`` is called in the child."""

    def __init__(self, slot, age, listeners, options, auth_file, auth_channel, heartbeat,
                 stats_channels, connection_table, rate_table, device_table):
        self.slot = slot
        self.devices = DeviceTally(device_table, slot)  # a worker's tallies, once forked
        self.stats_channels = stats_channels
        self.connection_table = connection_table
        self.rate_limiter = RateLimiter(rate_table)
        self.age = age
        self.listeners = listeners  # listeners.Listener, shared with every worker
        self.acceptor = None  # listeners.Acceptor, made in the child
        self.tls = None  # TlsConnections, made in the child
        self.options = options
        self.auth_file = auth_file
        self.auth_channel = auth_channel  # new auth snapshots from the master
        self.heartbeat = heartbeat
        self.ppid = os.getpid()  # built in the master, before the fork
        self.alive = True
        self.stopping_since = None
        self.stop_deadline = None
        self._next_stats_report = self._next_spool_adoption = 0.0
        self.clients = None  # clients.Clients, made in the child
        self.lines = None  # outcomes.LineOutcomes, made in the child
        self.signals = None  # links.SignalQueue, made in the child

    # -- start-up (after fork) ---------------------------------------------

    def init_process(self, read_live_options):
        """Process-wide set-up in the child; an exception here is a boot error.

        ``read_live_options`` returns the live options the master last parsed,
        for SIGHUP.
        """
        self.read_live_options = read_live_options
        # Forked with the master's current options: the generation they come from.
        self._live_generation = read_live_options().get("generation", 0)
        self.clock = time.monotonic
        self.selector = selectors.DefaultSelector()
        self.signals = SignalQueue((signal.SIGTERM, signal.SIGINT, signal.SIGQUIT,
                                    signal.SIGHUP, signal.SIGUSR1, signal.SIGTTIN,
                                    signal.SIGTTOU, signal.SIGUSR2))
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        self.selector.register(self.signals, selectors.EVENT_READ, self.signals.drain)
        self.selector.register(self.auth_channel.worker_end, selectors.EVENT_READ,
                               self._on_reload)
        options = self.options
        self.destinations = Destinations(options, self.selector, self.clock, self.slot)
        tls = next((listener for listener in self.listeners if listener.tls), None)
        self.tls = TlsConnections(options, self.clock, tls and tls.ticket_keys,
                                  tls and tls.certificate)  # the master's last good pair
        self.clients = Clients(options, self.selector, self.clock, self.tls, self._on_readable)
        self.acceptor = Acceptor(self.listeners, self.selector, self.connection_table,
                                 self.slot, self.clock, self.clients.admit,
                                 self.clients.__len__)
        if self.tls.context is None:
            self.acceptor.drop("tls")  # no TLS clients for this worker (logged)
        if options.spool_dir:
            self.destinations.replay_stranded(options.spool_dir, options.spool_max_bytes)
        self.stats = WorkerStats(self.stats_channels, options.stats_per_key)
        self.lines = LineOutcomes(options.log_rejections, self.stats, self.clock, self.devices)
        outbox = self.stats_channels.outbox_out  # the master's self-metrics, to send
        self.selector.register(outbox, selectors.EVENT_READ,
                               lambda mask: self.destinations.send_datagram(outbox))
        self.destinations.flush()
        self.heartbeat.notify()
        self._apply_connection_limits()
        self.acceptor.update(self.accepting, self.max_connections)

    # -- the loop ------------------------------------------------------------

    def run(self):
        next_housekeeping = flushed_at = 0.0
        timeout = TICK
        while self.alive:
            retry = self.destinations.seconds_to_next_write(self.clock())
            if retry is not None:
                timeout = min(timeout, retry)
            events = self.selector.select(timeout)
            for key, mask in events:
                key.data(mask)
            # While clients keep the loop busy, Carbon gets one write per FLUSH_INTERVAL
            # (a fleet that sends a line per connection would cost a write each).
            now = self.clock()
            flush_now = not events or now - flushed_at >= FLUSH_INTERVAL
            if flush_now:
                self.destinations.flush()
                flushed_at = now
            # Back-pressure, except when stopping: then clients are read to the end.
            pause = self.destinations.full and self.stopping_since is None
            if self.clients.paused != pause:
                self._set_paused(pause)
            look_again = self.acceptor.update(self.accepting, self.max_connections)
            timeout = TICK if look_again is None else min(TICK, look_again)
            if not flush_now:
                timeout = min(timeout, FLUSH_INTERVAL)
            if self.signals.pending:
                self._handle_signals()
            now = self.clock()
            if now >= next_housekeeping:
                next_housekeeping = now + TICK
                self._housekeeping(now)
        self._shutdown()

    def _housekeeping(self, now):
        self.heartbeat.notify()
        if now >= self._next_stats_report:
            self._next_stats_report = now + STATS_REPORT_INTERVAL
            self.report_stats()
        self.lines.log.tick(int(time.time()))
        if os.getppid() != self.ppid and self.stop_deadline != ORPHAN_STOP_SECONDS:
            log.warning("master process is gone; worker stopping",
                        extra={"master_pid": self.ppid})
            self.begin_stop(graceful=True, seconds=ORPHAN_STOP_SECONDS)
        self.clients.close_late(now)
        if now >= self._next_spool_adoption:
            self._next_spool_adoption = now + SPOOL_ADOPTION_INTERVAL
            self.destinations.adopt_orphan_spools()
        if self.stopping_since is not None:
            self._check_stop_done(now)

    def _handle_signals(self):
        for signum in self.signals.take():
            if signum == signal.SIGTERM or signum == signal.SIGINT:
                self.begin_stop(graceful=True)
            elif signum == signal.SIGQUIT:
                self.begin_stop(graceful=False)
            elif signum == signal.SIGHUP:  # sent to this worker: handled as the master's
                self.auth_channel.request_update()
            elif signum == signal.SIGUSR1:
                reopen_log_files()
            # TTIN, TTOU and USR2 are for the master; a worker ignores them.

    def _on_reload(self, mask):
        """The master's word after a SIGHUP or a change of the auth file: a new
        snapshot of it, or why there is none; after a SIGHUP, live options to read
        again, and the TLS certificate files if the master found new good ones."""
        for update in self.auth_channel.receive():
            if isinstance(update, CertificateFiles):
                self.tls.take(update)
            else:
                self.devices.keep_counts(self.auth_file.db.keys)  # before they are dropped
                self.auth_file.take(update)
        live = self.read_live_options()
        if live.get("generation", 0) != self._live_generation:
            self._live_generation = live.get("generation", 0)
            self._reload_options(live)

    def counters(self):
        counters = self.lines.counters()
        counters.update({
            "maxConnectionsReached": self.acceptor.cap_reached,
            "tlsHandshakeErrors": self.tls.count,
            "authReloads": self.auth_file.reloads,
            "authReloadErrors": self.auth_file.reload_errors,
        })
        counters.update(self.clients.counters())
        counters.update(self.destinations.counters())
        return counters

    def report_stats(self):
        self.devices.record(self.clients, self.stats, self.auth_file.db.keys)
        gauges = self.destinations.gauges()
        gauges["activeConnections"] = len(self.clients)
        self.stats.report(self.counters(), gauges)

    def _reload_options(self, live):
        """Take the live options the master parsed (it logged any error, once)."""
        for name, value in live.items():
            if name in LIVE_OPTIONS:
                setattr(self.options, name, value)
        set_level(self.options.log_level)
        self._apply_connection_limits()
        self.lines.log.per_second = self.options.log_rejections  # from the next second
        self.destinations.set_live_options(self.options)
        log.debug("options re-read", extra={"skew": self.options.skew,
                                            "log_level": self.options.log_level})

    def _apply_connection_limits(self):
        self.max_connections = connection_limit(self.options.max_connections)
        self.clients.limit(self.max_connections)

    # -- clients -------------------------------------------------------------

    @property
    def accepting(self):
        """Taking new clients: not paused by back-pressure, not stopping."""
        return not self.clients.paused and self.stopping_since is None

    def _set_paused(self, paused):
        """Stop or resume reading clients: back-pressure while Carbon cannot keep up."""
        if paused:
            self.acceptor.stop()
        self.clients.set_paused(paused)
        if paused:
            log.warning("Carbon backlog is full (memory and spool); pausing reads from "
                        "clients", extra=self.destinations.backlog())
        else:
            log.warning("Carbon backlog has room again; reading clients")

    def _on_readable(self, conn):
        """The hot path: read a chunk, split it into lines, verify, queue for Carbon.
        True if it read something and did not see the end of the stream."""
        if conn.state == HANDSHAKE:
            self.clients.handshake(conn)
            return
        try:
            data = self.tls.recv(conn, RECV_SIZE) if conn.tls else conn.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except CloseConnection:
            self.clients.close(conn)
            return
        except OSError:
            data = b""
        if conn.state == HEADER:
            data = self.clients.after_proxy_header(conn, data)
            if not data:
                return
        if conn.fresh and data and not self.clients.first_read(conn, data):
            return
        if data:
            lines, too_long = conn.split(data, self.options.max_line_length)
            if too_long:
                self._close_too_long(conn, too_long)
                data = b""  # the connection is closed: nothing more to read
        else:
            lines = conn.last_lines()
            self.clients.close(conn)
        db = self.auth_file.db
        keys = db.keys
        try:
            accepted = filter_lines(lines, keys, int(time.time()), self.options.skew,
                                    self.lines.rejecter(conn, keys), self.options.allow_tags,
                                    self.rate_limiter.for_batch(db, self.options.key_max_rate))
        except Exception:  # a bug must cost this read's lines, not the worker
            self.lines.internal_error(conn, len(lines))
            return
        if accepted:
            conn.key = keys.last_accepted  # whose device: only a line that passed says
            conn.last_active = self.clock()
            self.lines.forwarded += len(accepted)
            self.destinations.send(accepted)
        if (self.stopping_since is not None and data and len(data) < RECV_SIZE
                and not conn.partial and conn.tls):
            self.clients.close(conn)  # stopping, and everything the client sent is read
        return bool(data)

    def _close_too_long(self, conn, too_long):
        """Lines past --max-line-length: each is counted, and the connection closed once
        the other lines of the read are checked (a gateway's other devices go on)."""
        reject = self.lines.rejecter(conn, {})
        for _ in range(too_long):
            reject(LINE_TOO_LONG, None, None)
        self.clients.close(conn, "line longer than --max-line-length",
                           max_line_length=self.options.max_line_length)

    # -- stopping --------------------------------------------------------------

    def begin_stop(self, graceful, seconds=None):
        """Stop accepting; a graceful stop also drains clients and Carbon first."""
        if self.stopping_since is None:
            self.stopping_since = self.clock()
            self.acceptor.close()
        if not graceful:
            self.alive = False
            return
        self.stop_deadline = self.options.graceful_timeout if seconds is None else seconds
        self.clients.half_close()
        # Keep trying Carbon until the deadline; spooling is the last resort.
        self.destinations.retry_within(STOPPING_MAX_BACKOFF)
        # Clients stay open until what they already sent has been read.
        self._check_stop_done(self.stopping_since)

    def _check_stop_done(self, now):
        stopping_for = now - self.stopping_since
        self.clients.drain(stopping_for >= PARTIAL_LINE_GRACE,
                           lambda conn: self.lines.rejecter(conn, {})(MALFORMED, None, None))
        deadline_passed = stopping_for >= self.stop_deadline
        if deadline_passed or (not self.clients and self.destinations.memory_empty):
            self.alive = False

    def save_what_is_held(self):
        """After a crash: keep the lines not yet sent for the next worker, if there is a spool."""
        try:
            self.destinations.save_to_spool("crashed worker")
        except Exception:
            log.exception("could not save the lines held by the crashed worker")

    def _shutdown(self):
        self.clients.close_all()
        self.lines.log.flush()
        self.destinations.flush()
        self.destinations.save_to_spool("worker stopping")
        self.report_stats()
        log.info("worker stopped", extra={"forwarded": self.lines.forwarded,
                                          "rejected": sum(self.lines.rejected.values())})


def run_worker_process(worker, close_the_masters, read_live_options, boot, signal_mask):
    """A worker's process, forked by the master with its signals blocked: the exit
    status (it never returns into the master's code)."""
    try:
        close_the_masters()
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        try:
            worker.init_process(read_live_options)
            boot.report()
        except Exception as e:
            log.error("worker failed to start: %s", e)
            return WORKER_BOOT_ERROR
        signal.pthread_sigmask(signal.SIG_SETMASK, signal_mask)
        worker.run()
        return 0
    except Exception:
        log.exception("worker crashed")
        worker.save_what_is_held()
        return 1
    finally:
        logging.shutdown()
