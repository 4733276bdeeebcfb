"""Upgrading in place: on SIGUSR2 a new amproxy takes over the listening sockets.

gunicorn's re-exec is the model.  The running master forks and executes the
command it was started with, which after a package upgrade is the new code.
The new master inherits the listening sockets the way systemd hands them
over (LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES), so the port never closes:
devices that connect meanwhile wait in its queue and are served by whichever
workers accept first.  Once all its workers are up, the new master takes the
pidfile and the stats socket, says so on a pipe, and sends SIGTERM to the old
one, whose workers stop accepting, read what their clients sent, forward it and
exit.  Until then the old master is in charge: a new master that fails (its
stderr comes back on that pipe, for the log) or is not ready in time changes
nothing, and a stop sent to the old master stops both.
"""

import fcntl
import logging
import os
import signal
import sys
import time

from . import daemon
from .errors import AmproxyError
from .links import fork_plain_child

log = logging.getLogger("amproxy.master")

# The pid of the master a re-executed one replaces, and its end of the pipe back.
PREDECESSOR_ENV = "AMPROXY_PREDECESSOR"
REPORT_FD_ENV = "AMPROXY_HANDOVER_FD"
# What the new master writes on the pipe once it has taken over.
TOOK_OVER = b"\0took over\n"
# A new master not ready by then is stopped (the init script waits longer).
READY_TIMEOUT = 45.0
STOP_GRACE = 5.0
# Of what the new master wrote, the end is kept to say why it failed.
REPORT_TAIL_BYTES = 4096

# Taken at start, before --daemon changes directory: a relative argv[0] stays right.
_SCRIPT = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""


def command_line():
    """How this program was started: its script (the installed command, which an
    upgrade replaced), or the interpreter with the same flags (``-m amproxy``)."""
    if os.path.basename(_SCRIPT) != "__main__.py" and os.access(_SCRIPT, os.X_OK):
        return [_SCRIPT] + sys.argv[1:]
    flags = getattr(sys, "orig_argv", None)  # Python 3.10+: -I, -m amproxy...
    if flags:
        return [sys.executable] + flags[1:]
    return [sys.executable, "-m", "amproxy"] + sys.argv[1:]


class Successor:
    """The old master's side: the new master it started, until that one takes over."""

    def __init__(self):
        self.pid = None
        self.took_over = False
        self._report = None  # our end of the pipe
        self._said = b""
        self._started_at = self._stop_sent_at = None

    def start(self, listeners):
        if self.pid is not None:
            log.warning("SIGUSR2 ignored: a new master is already starting",
                        extra={"new_master_pid": self.pid})
            return
        argv = command_line()
        report, theirs = os.pipe()
        pid = fork_plain_child()
        if pid == 0:
            _exec_with_sockets(argv, listeners, theirs)  # never returns
        os.close(theirs)
        os.set_blocking(report, False)
        self.pid, self.took_over, self._report, self._said = pid, False, report, b""
        self._started_at, self._stop_sent_at = time.monotonic(), None
        log.info("starting a new master on the same sockets; this one stops when it is "
                 "ready", extra={"new_master_pid": pid, "command": argv[0]})

    def readable(self):
        return [self._report] if self._report is not None else []

    def read_report(self):
        """Take what the new master wrote: its stderr, and whether it took over."""
        while self._report is not None:
            try:
                data = os.read(self._report, 65536)
            except (BlockingIOError, InterruptedError):
                return
            if not data:
                self._close_report()
                return
            if TOOK_OVER in data:
                self.took_over = True
                data = data.replace(TOOK_OVER, b"")
            self._said = (self._said + data)[-REPORT_TAIL_BYTES:]

    def _close_report(self):
        if self._report is not None:
            os.close(self._report)
            self._report = None

    def check_ready_in_time(self):
        """A new master that is not ready in time is stopped (killed, if it must be)."""
        if self.pid is None or self.took_over:
            return
        now = time.monotonic()
        if self._stop_sent_at is None and now - self._started_at >= READY_TIMEOUT:
            log.error("the new master is not ready after %d s; stopping it, this one goes "
                      "on serving", READY_TIMEOUT, extra={"new_master_pid": self.pid})
            self._signal(signal.SIGTERM)
            self._stop_sent_at = now
        elif self._stop_sent_at is not None and now - self._stop_sent_at >= STOP_GRACE:
            self._signal(signal.SIGKILL)

    def stop_unless_taken_over(self):
        """The old master is told to stop before its successor took over: stop both."""
        self.read_report()
        if self.pid is not None and not self.took_over:
            log.warning("stopping the new master too: it had not taken over",
                        extra={"new_master_pid": self.pid})
            self._signal(signal.SIGTERM)

    def kill_unless_taken_over(self):
        if self.pid is not None and not self.took_over:
            self._signal(signal.SIGKILL)

    def _signal(self, sig):
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    def reaped(self, pid, status, stopping, pidfile):
        """True if ``pid`` was the new master (it is never a worker).  If it failed, the
        pidfile is written again, same pid, new file: a waiting restart sees it failed."""
        if pid != self.pid:
            return False
        self.read_report()
        self._close_report()
        self.pid = None
        if self.took_over:
            return True
        said = [line for line in self._said.decode("utf-8", "replace").splitlines()
                if line.strip()]
        log.error("the new master exited with status %d%s", os.waitstatus_to_exitcode(status),
                  "" if stopping else "; this one goes on serving",
                  extra={"new_master_pid": pid, "reason": said[-1].strip() if said else ""})
        if not stopping and pidfile is not None:
            try:
                pidfile.create(os.getpid())
            except AmproxyError as e:
                log.error("%s", e)
        return True

    def tell_systemd_stopping(self):
        """Under systemd, a successor that took over becomes the main process."""
        self.read_report()
        daemon.systemd_notify("MAINPID=%d" % self.pid if self.pid and self.took_over
                              else "STOPPING=1")


def _exec_with_sockets(argv, listeners, report):
    """In the forked child: the listening sockets at 3, 4..., then exec; never returns."""
    try:
        # Parked past 3..3+n first, so that moving one never overwrites another.
        first_free = daemon.SD_LISTEN_FDS_START + len(listeners)
        parked = [fcntl.fcntl(fd, fcntl.F_DUPFD, first_free)
                  for fd in [listener.fileno() for listener in listeners] + [report]]
        for number, fd in enumerate(parked[:-1]):
            os.dup2(fd, daemon.SD_LISTEN_FDS_START + number)  # inheritable, unlike fd
            os.close(fd)
        report = parked[-1]
        os.set_inheritable(report, True)
        env = dict(os.environ, LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(listeners)),
                   LISTEN_FDNAMES=":".join(listener.kind for listener in listeners))
        env[PREDECESSOR_ENV] = str(os.getppid())
        env[REPORT_FD_ENV] = str(report)
        os.execve(argv[0], argv, env)
    except BaseException as e:  # the old master logs this as the reason
        try:
            os.write(report, ("cannot start %s: %s\n" % (argv[0], e)).encode())
        finally:
            os._exit(127)


class _StderrToPredecessor:
    """stderr, copied to the old master until this one takes over."""

    def __init__(self, stream, fd):
        self.stream = stream
        self.fd = fd

    def write(self, text):
        written = self.stream.write(text)
        if self.fd is not None:
            try:
                os.write(self.fd, text.encode("utf-8", "replace"))
            except OSError:
                self.fd = None  # the old master is gone
        return written

    def finish(self):
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.write(fd, TOOK_OVER)
            os.close(fd)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def report_to_predecessor():
    """In a master started by SIGUSR2, first thing: what it writes to stderr until it
    takes over (a bad option, say) goes to the old master too, which logs it."""
    value = os.environ.pop(REPORT_FD_ENV, "")
    if value.isdigit() and os.environ.get(PREDECESSOR_ENV):
        os.set_inheritable(int(value), False)
        sys.stderr = _StderrToPredecessor(sys.stderr, int(value))


class Predecessor:
    """The new master's side: the master it replaces, if it was started by SIGUSR2."""

    def __init__(self):
        value = os.environ.pop(PREDECESSOR_ENV, "")
        # Only the parent that exec'd us; a stale variable names no one.
        self.pid = int(value) if value.isdigit() and int(value) == os.getppid() else None

    def __bool__(self):
        return self.pid is not None

    def take_over(self, pidfile, pid, claim_stats_socket):
        """Ready: what names the running server becomes ours, the pidfile and the stats
        socket (AmproxyError if it cannot), and the old master is told, and stops (if it
        is still our parent, not a pid reused since)."""
        if pidfile is not None:
            pidfile.create(pid, replacing=self.pid)
        claim_stats_socket()
        if isinstance(sys.stderr, _StderrToPredecessor):
            sys.stderr.finish()
        if os.getppid() == self.pid:
            log.info("took over the sockets; the old master stops once its clients are "
                     "drained", extra={"old_master_pid": self.pid})
            os.kill(self.pid, signal.SIGTERM)
        self.pid = None
