"""The master ("arbiter"): bind, fork workers, supervise them, handle signals.

Signal handlers only queue the signal and wake the loop through a pipe.
The loop takes signals off the queue and calls ``handle_<name>``; between
signals it reaps dead workers, kills hung ones and starts missing ones.
"""

import logging
import os
import select
import signal
import time

from . import daemon
from .authsnapshot import AuthFile, AuthReloads
from .balance import NOT_ACCEPTING, ConnectionTable
from .config import check_options, config_file_path, reload_server_args, stats_socket_path
from .errors import AmproxyError
from .handover import Predecessor, Successor
from .links import (SIGNAL_NAMES, SIGNALS, BootReports, Heartbeat, LiveOptions, SignalQueue,
                    SnapshotChannel)
from .listeners import connection_limit, open_listeners, raise_file_limit
from .logs import reopen_log_files, set_level
from .proxyprotocol import LOOPBACK
from .ratelimit import RateTable
from .tls import CertificateReloads
from .devices import DeviceTable
from .devicequery import DeviceQueries
from .stats import StatsService
from .pool import WorkerPool
from .worker import WORKER_BOOT_ERROR, Worker, run_worker_process

log = logging.getLogger(__name__)

# How long workers may take to exit after the graceful timeout, before SIGKILL.
KILL_GRACE = 5.0


class HaltServer(AmproxyError):
    def __init__(self, reason, exit_status=1):
        super().__init__(reason)
        self.reason = reason
        self.exit_status = exit_status


def check_access(options):
    """What the workers will need, checked as the user they run as (the master read the
    auth file before dropping privileges, and every reload happens after)."""
    who = options.user or "this user"
    try:
        with open(options.auth_file, "rb"):
            pass
    except OSError as e:
        raise AmproxyError("auth file %s cannot be read by %s, which reloads it: %s" % (
            options.auth_file, who, e.strerror or e)) from None
    if options.spool_dir:
        try:
            os.makedirs(options.spool_dir, mode=0o750, exist_ok=True)
        except OSError as e:
            raise AmproxyError("spool directory %s cannot be created by %s: %s" % (
                options.spool_dir, who, e.strerror or e)) from None
        if not os.access(options.spool_dir, os.W_OK | os.X_OK):
            raise AmproxyError("spool directory %s is not writable by %s" % (
                options.spool_dir, who))


def log_started(options, listeners, workers, keys):
    """The line that says the server is up, and with what."""
    addresses = {listener.kind: listener.address() for listener in listeners}
    extra = {
        "addr": addresses["plain"], "tls_addr": addresses.get("tls", "none"),
        "max_connections": connection_limit(options.max_connections),
        "carbon": ",".join(map(str, options.carbon_addr)), "workers": workers,
        "keys": keys, "auth_file": options.auth_file,
        "spool_dir": options.spool_dir or "none",
        "proxy_protocol": "on" if options.proxy_protocol else "off"}
    if options.proxy_protocol:  # the balancers it takes headers from
        extra["proxy_protocol_from"] = ",".join(
            map(str, options.proxy_protocol_from or LOOPBACK))
    log.info("amproxy started", extra=extra)


def log_worker_exit(pid, code):
    """A worker's exit, as the master reaps it (a new one is started after)."""
    if code == WORKER_BOOT_ERROR:
        raise HaltServer("a worker failed to start (see its error above); "
                         "stopping instead of respawning it", WORKER_BOOT_ERROR)
    if code < 0 and code != -signal.SIGTERM:
        log.error("worker killed by signal %s; starting a new one",
                  signal.Signals(-code).name, extra={"worker_pid": pid})
    elif code > 0:
        log.error("worker exited with status %d; starting a new one", code,
                  extra={"worker_pid": pid})


class Master:
    def __init__(self, options, argv=()):
        self.options = options
        self.argv = list(argv)  # to read the options again on SIGHUP
        self.pool = WorkerPool(options.workers, self._make_worker, self._run_worker)
        self.workers = self.pool.workers  # pid -> Worker
        self.listeners = []  # listeners.Listener: the plain one first
        self.auth_file = None
        self.auth_reloads = None  # AuthReloads
        self.certificates = None  # tls.CertificateReloads, with a TLS listener
        self.pidfile = None
        self.ready = False
        self.signals = None  # links.SignalQueue
        self.boot = None  # links.BootReports: the workers that are up
        self._ready_fd = None  # --daemon: the first process waits on it
        self.live_options = None
        self.connection_table = None
        self.rate_table = None
        self.stats = None  # a StatsService
        self.pid = os.getpid()
        self.stopping = False
        # SIGUSR2: the new master this one starts, or the old one this one replaces.
        self.successor = Successor()
        self.predecessor = Predecessor()

    # -- start-up --------------------------------------------------------------

    def start(self):
        """Everything that can fail on bad input happens before detaching."""
        options = self.options
        self.auth_file = AuthFile(options.auth_file)
        db = self.auth_file.load()
        # What each key's lines became, shared by the workers; a revoked key's is dropped.
        self.device_table = DeviceTable(len(db), db.names())
        self.auth_reloads = AuthReloads(self.auth_file, self._channels, lambda new: (
            self.device_table.forget_except(new.names())))
        self.listeners = open_listeners(options.addr, options.tls_addr,
                                        daemon.inherited_listeners())
        raise_file_limit(options.max_connections)
        if options.pidfile:
            self.pidfile = daemon.Pidfile(options.pidfile)
            self.pidfile.check(self.predecessor.pid)
        for warning in check_options(options):  # before stderr goes, when detaching
            log.warning(warning)
        if options.daemon and not self.predecessor:  # the old master is detached already
            self._ready_fd = daemon.daemonize()
        self.pid = os.getpid()
        if self.pidfile is not None and not self.predecessor:  # written when it is ready
            self.pidfile.create(self.pid)
        daemon.drop_privileges(options.user, options.group)
        self._check_as_user()
        self.live_options = LiveOptions()
        self.connection_table = ConnectionTable()
        # Replays are remembered for twice the skew, of every line the limits allow.
        self.rate_table = RateTable(len(db), (db.rate_total + options.key_max_rate * len(db))
                                    * 2 * options.skew)
        self.stats = StatsService(options, stats_socket_path(options), bool(self.predecessor),
                                  DeviceQueries(self.device_table, self.auth_file))
        self.boot = BootReports()
        self.signals = SignalQueue(SIGNALS, limit=5)
        log_started(options, self.listeners, self.pool.count, len(db))

    def _check_as_user(self):
        """What the workers need, checked as the user they run as: the TLS certificate
        files are read and checked as on SIGHUP, and the workers load that copy."""
        check_access(self.options)
        if self.options.tls_addr:
            listener = next(listener for listener in self.listeners if listener.tls)
            self.certificates = CertificateReloads(listener, self.options, self._channels)

    def _channels(self):
        return [worker.auth_channel for worker in self.workers.values()]

    # -- the loop ----------------------------------------------------------------

    def run(self):
        """Run until told to stop; return the exit status."""
        try:
            self.start()
            self.pool.manage()
            while True:
                pending = self.signals.pending
                sig = pending.pop(0) if pending else None
                if sig is None:
                    self.sleep()
                    if self.signals.pending:
                        continue  # a TERM must win over respawning
                    self.reap_workers()
                    self.pool.murder(self.options.worker_timeout)
                    self.pool.manage()
                    self.stats.tick(list(self.workers))
                    self.auth_reloads.check_file(self.options.auth_reload_interval)
                    self.successor.check_ready_in_time()
                    continue
                if sig != signal.SIGCHLD:
                    log.info("received SIG%s", SIGNAL_NAMES[sig].upper())
                getattr(self, "handle_" + SIGNAL_NAMES[sig])()
        except StopIteration as stop:
            return stop.value or 0
        except HaltServer as halt:
            log.error(halt.reason)
            self.stop(graceful=False)
            return halt.exit_status
        finally:
            if self.stats is not None:
                self.stats.close()
            if self.pidfile is not None:
                self.pidfile.unlink()

    def sleep(self, timeout=1.0):
        """Wait for a signal, a booted worker, stats, the auth file's next check, or
        ``timeout`` seconds."""
        timeout = self.auth_reloads.timeout(timeout)
        channels = {w.auth_channel.master_end: w.auth_channel for w in self.workers.values()}
        watched = [self.signals, self.boot, *channels, *self.auth_reloads.readable(),
                   *self.successor.readable()] + self.stats.readable()
        try:
            ready, writable, _ = select.select(watched, self.stats.writable(), [],
                                               self.stats.timeout(timeout))
        except InterruptedError:
            return
        self.stats.on_ready(ready, writable, list(self.workers))
        if set(self.successor.readable()) & set(ready):
            self.successor.read_report()
        if self.signals in ready:
            self.signals.drain()
        self.auth_reloads.on_ready(ready)
        # A SIGHUP sent to a worker is one to the master: one reload, wherever sent
        # (queued as the master's own, so a stop in progress ignores it as well).
        if any([channels[r].update_requested() for r in ready if r in channels]):
            self.signals.record(signal.SIGHUP)
        if self.boot in ready:
            self.boot.read()
            self._check_ready()

    def _check_ready(self):
        """Tell systemd we are ready once the first full set of workers is up."""
        if not self.ready and len(self.boot.booted & set(self.workers)) >= self.pool.count:
            self.ready = True
            log.info("workers ready", extra={"workers": len(self.workers)})
            daemon.systemd_notify("READY=1\nSTATUS=forwarding with %d workers"
                                  % len(self.workers))
            if self._ready_fd is not None:
                daemon.ready(self._ready_fd)
                self._ready_fd = None
            if self.predecessor:
                try:
                    self.predecessor.take_over(self.pidfile, self.pid, self.stats.claim_path)
                except AmproxyError as e:
                    log.error("%s; the old master goes on serving", e)
                    self.stop(graceful=True)
                    raise StopIteration(1) from None

    # -- signals ---------------------------------------------------------------------

    def handle_chld(self):
        self.reap_workers()
        self.pool.manage()

    def handle_hup(self):
        """Re-read the config file and the auth file, and tell every worker."""
        daemon.systemd_notify("RELOADING=1\nMONOTONIC_USEC=%d"
                              % (time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000))
        self.reload_options()
        self.live_options.publish(self.options)
        if self.certificates is not None:
            self.certificates.reload()
        # Compiled in a child; with it the workers read the live options again.
        self.auth_reloads.request("SIGHUP")
        self.pool.manage()
        daemon.systemd_notify("READY=1")

    def reload_options(self):
        """Parse the config once, here; the workers take the live options from ``live_options``."""
        try:
            changed, at_restart = reload_server_args(self.options, self.argv)
        except AmproxyError as e:
            log.error("config file %s not reloaded, keeping the running options: %s",
                      config_file_path(self.argv), e)
            return
        for name in at_restart:
            log.warning("option %s changed; it takes effect at the next restart",
                        name.replace("_", "-"))
        self.pool.count = self.options.workers
        set_level(self.options.log_level)
        log.info("config reloaded", extra={"changed": ",".join(
            name.replace("_", "-") for name in changed) or "nothing"})

    def handle_term(self):
        self.stop(graceful=True)
        raise StopIteration(0)

    handle_int = handle_term

    def handle_quit(self):
        self.stop(graceful=False)
        raise StopIteration(0)

    def handle_ttin(self):
        self.pool.count += 1
        self.pool.manage()

    def handle_ttou(self):
        self.pool.count = max(1, self.pool.count - 1)
        self.pool.manage()

    def handle_usr2(self):
        """Upgrade in place: a new master (the installed code) takes over the sockets."""
        if self.predecessor or not self.ready:
            log.warning("SIGUSR2 ignored: this master is not serving yet")
            return
        self.successor.start(self.listeners)

    def handle_usr1(self):
        """Reopen log files after logrotate moved them."""
        reopen_log_files()
        self.pool.kill_all(signal.SIGUSR1)

    # -- workers ---------------------------------------------------------------------

    def _make_worker(self, slot, age):
        if not self.ready:
            # Devices cut off by a restart reconnect all at once: a slot still
            # booting counts as empty, so the first worker up does not take them all.
            self.connection_table.publish(slot, 0)
        return Worker(slot, age, self.listeners, self.options, self.auth_file,
                      SnapshotChannel(), Heartbeat(), self.stats.channels,
                      self.connection_table, self.rate_table, self.device_table)

    def _run_worker(self, worker, signal_mask):
        """In the child: never return into the master's code."""
        def close_the_masters():
            self.signals.close()
            self.boot.close_in_worker()
            for other in self.workers.values():
                other.auth_channel.close_master_end()
            worker.auth_channel.close_master_end()
            if self._ready_fd is not None:
                os.close(self._ready_fd)  # only the master's exit may close it
            self.stats.close_in_worker()
        return run_worker_process(worker, close_the_masters, self.live_options.read,
                                  self.boot, signal_mask)

    def reap_workers(self):
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if not pid:
                return
            if self.auth_reloads.reaped(pid, status):
                continue
            if self.successor.reaped(pid, status, self.stopping, self.pidfile):
                continue
            worker = self.workers.pop(pid, None)
            self.boot.booted.discard(pid)
            self.stats.forget_worker(pid)
            if worker is None:
                continue
            worker.heartbeat.close()
            worker.auth_channel.close_master_end()
            self.connection_table.publish(worker.slot, NOT_ACCEPTING)
            self.device_table.clear_worker(worker.slot)  # its clients are gone
            log_worker_exit(pid, os.waitstatus_to_exitcode(status))

    def stop(self, graceful=True):
        """Stop accepting, ask every worker to stop, wait, then kill stragglers."""
        self.stopping = True
        self.successor.stop_unless_taken_over()
        self.successor.tell_systemd_stopping()
        for listener in self.listeners:
            listener.close()
        self.listeners = []
        if self.auth_reloads is not None:
            self.auth_reloads.stop()
        self.pool.kill_all(signal.SIGTERM if graceful else signal.SIGQUIT)
        limit = (self.options.graceful_timeout if graceful else 0) + KILL_GRACE
        deadline = time.monotonic() + limit
        while self._children_left() and time.monotonic() < deadline:
            self._reap_quietly()
            self.sleep(0.1)
        if self._children_left():
            log.error("workers did not stop in time; killing them",
                      extra={"workers": len(self.workers)})
            self.pool.kill_all(signal.SIGKILL)
            self.successor.kill_unless_taken_over()
            while self._children_left():
                self._reap_quietly()
                self.sleep(0.1)
        log.info("amproxy stopped")

    def _children_left(self):  # workers, or a new master that had not taken over
        return self.workers or (self.successor.pid is not None and not self.successor.took_over)

    def _reap_quietly(self):
        try:
            self.reap_workers()
        except HaltServer:
            pass
