"""Upgrading in place: on SIGUSR2 a new amproxy takes over the listening sockets.

gunicorn's re-exec is the model.  The running master forks and executes the
command it was started with, which after a package upgrade is the new code.
The new master inherits the listening sockets the way systemd hands them
over (LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES), so the port never closes:
devices that connect meanwhile wait in its queue and are served by whichever
workers accept first.  Once all its workers are up, the new master writes the
pidfile and sends SIGTERM to the old one, whose workers stop accepting, read
what their clients sent, forward it and exit.  A new master that fails before
it is ready changes nothing: the old one goes on serving.
"""

import fcntl
import logging
import os
import signal
import sys

from . import daemon
from .errors import AmproxyError

log = logging.getLogger("amproxy.master")

# The pid of the master a re-executed one replaces.
PREDECESSOR_ENV = "AMPROXY_PREDECESSOR"


def command_line():
    """How this program was started: its script (the installed command, which an
    upgrade replaced), or ``python -m amproxy``."""
    script = sys.argv[0]
    if os.path.basename(script) != "__main__.py" and os.access(script, os.X_OK):
        return [script] + sys.argv[1:]
    return [sys.executable, "-m", "amproxy"] + sys.argv[1:]


class Successor:
    """The old master's side: the new master it started, until that one takes over."""

    def __init__(self):
        self.pid = None

    def start(self, listeners):
        if self.pid is not None:
            log.warning("SIGUSR2 ignored: a new master is already starting",
                        extra={"new_master_pid": self.pid})
            return
        argv = command_line()
        pid = os.fork()
        if pid == 0:
            try:
                _exec_with_sockets(argv, listeners)
            finally:
                os._exit(127)
        self.pid = pid
        log.info("starting a new master on the same sockets; this one stops when it is "
                 "ready", extra={"new_master_pid": pid, "command": argv[0]})

    def reaped(self, pid, status, stopping, pidfile):
        """True if ``pid`` was the new master (it is never a worker).  If it failed, the
        pidfile is written again, same pid, new file: a waiting restart sees it failed."""
        if pid != self.pid:
            return False
        self.pid = None
        log.error("the new master exited with status %d%s", os.waitstatus_to_exitcode(status),
                  "" if stopping else "; this one goes on serving",
                  extra={"new_master_pid": pid})
        if not stopping and pidfile is not None:
            try:
                pidfile.create(os.getpid())
            except AmproxyError as e:
                log.error("%s", e)
        return True

    def tell_systemd_stopping(self):
        """Under systemd, a successor becomes the main process; else this one stops."""
        daemon.systemd_notify("STOPPING=1" if self.pid is None else "MAINPID=%d" % self.pid)


def _exec_with_sockets(argv, listeners):
    """In the forked child: the listening sockets at 3, 4..., then exec."""
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    # Parked past 3..3+n first, so that moving one never overwrites another.
    first_free = daemon.SD_LISTEN_FDS_START + len(listeners)
    parked = [fcntl.fcntl(listener.fileno(), fcntl.F_DUPFD, first_free)
              for listener in listeners]
    for number, fd in enumerate(parked):
        os.dup2(fd, daemon.SD_LISTEN_FDS_START + number)  # inheritable, unlike fd
        os.close(fd)
    env = dict(os.environ, LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(listeners)),
               LISTEN_FDNAMES=":".join(listener.kind for listener in listeners))
    env[PREDECESSOR_ENV] = str(os.getppid())
    os.execve(argv[0], argv, env)


class Predecessor:
    """The new master's side: the master it replaces, if it was started by SIGUSR2."""

    def __init__(self):
        value = os.environ.pop(PREDECESSOR_ENV, "")
        # Only the parent that exec'd us; a stale variable names no one.
        self.pid = int(value) if value.isdigit() and int(value) == os.getppid() else None

    def __bool__(self):
        return self.pid is not None

    def take_over(self, pidfile, pid):
        """Ready: the pidfile is ours (AmproxyError if it cannot be written), and the old
        master stops (if it is still our parent, not a pid reused since)."""
        if pidfile is not None:
            pidfile.create(pid, replacing=self.pid)
        if os.getppid() == self.pid:
            log.info("took over the sockets; the old master stops once its clients are "
                     "drained", extra={"old_master_pid": self.pid})
            os.kill(self.pid, signal.SIGTERM)
        self.pid = None
