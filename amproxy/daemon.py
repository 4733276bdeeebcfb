"""What a well-behaved Unix daemon does: pidfile, detaching, dropping
privileges, and speaking systemd's notify and socket-activation protocols."""

import errno
import grp
import logging
import os
import pwd
import select
import socket
import sys

from .errors import AmproxyError
from .logs import chown_log_files

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3
# How long ``--daemon``'s first process waits for the server to be ready.
READY_TIMEOUT = 120


class Pidfile:
    """A pidfile written atomically and removed on exit only if it is still ours."""

    def __init__(self, path):
        self.path = path
        self.pid = None

    def running_pid(self):
        """The pid in the file if that process is a live amproxy, else None."""
        try:
            with open(self.path) as f:
                pid = int(f.read().strip() or 0)
        except (OSError, ValueError):
            return None
        if pid <= 0 or pid == os.getpid():
            return None
        try:
            with open("/proc/%d/cmdline" % pid, "rb") as f:
                cmdline = f.read()
        except OSError:
            return None
        return pid if b"amproxy" in cmdline else None

    def check(self, replacing=None):
        """Refuse to start twice; a stale file (its process is gone) is fine, and so is
        the master this one replaces (``replacing``, SIGUSR2)."""
        running = self.running_pid()
        if running and running != replacing:
            raise AmproxyError("pidfile %s names a running amproxy (pid %d); stop it "
                               "first or use another --pidfile" % (self.path, running))

    def create(self, pid, replacing=None):
        self.check(replacing)
        directory = os.path.dirname(os.path.abspath(self.path))
        temp = os.path.join(directory, ".%s.%d.tmp" % (os.path.basename(self.path), pid))
        try:
            # Root may be writing into a directory the daemon user owns: never
            # follow a link or reuse a file someone put there.
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            with open(fd, "w") as f:
                f.write("%d\n" % pid)
            os.rename(temp, self.path)
        except OSError as e:
            raise AmproxyError("cannot write pidfile %s: %s" % (
                self.path, e.strerror or e)) from None
        self.pid = pid

    def unlink(self):
        try:
            with open(self.path) as f:
                if int(f.read().strip() or 0) != self.pid:
                    return
            os.unlink(self.path)
        except (OSError, ValueError) as e:
            log.debug("pidfile %s not removed: %s", self.path, e)


def daemonize():
    """Detach from the terminal: fork, setsid, fork again; stdin/out/err to /dev/null.

    The first process stays until the daemon writes to the returned descriptor
    (``ready``) and exits 0 then, or 1 if the daemon exits first: an init
    script's start returns once amproxy serves, or fails.  Logging set up to
    a --log-file keeps its own descriptor.
    """
    ready_r, ready_w = os.pipe()
    if os.fork():
        os.close(ready_w)
        os._exit(_wait_until_ready(ready_r))
    os.close(ready_r)
    os.setsid()
    if os.fork():
        os._exit(0)
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)
    return ready_w


def _wait_until_ready(fd):
    if select.select([fd], [], [], READY_TIMEOUT)[0] and os.read(fd, 1):
        return 0
    print("amproxy: the server stopped (or was not ready after %d s); see its log"
          % READY_TIMEOUT, file=sys.stderr)
    return 1


def ready(fd):
    """Tell the waiting first process of ``daemonize`` that the server is ready."""
    try:
        os.write(fd, b"1")
        os.close(fd)
    except OSError:
        pass


def drop_privileges(user=None, group=None):
    """Become ``user`` (and ``group``, by default the user's group) for good."""
    if not user and not group:
        return
    try:
        entry = pwd.getpwnam(user) if user else None
        gid = grp.getgrnam(group).gr_gid if group else (entry.pw_gid if entry else None)
    except KeyError as e:
        raise AmproxyError("no such user or group: %s" % e.args[0]) from None
    if (entry is None or entry.pw_uid == os.geteuid()) and gid in (None, os.getegid()):
        return  # already: a master started by SIGUSR2 runs as the old one did
    chown_log_files(entry.pw_uid if entry else -1)
    try:
        if gid is not None:
            os.setgroups([gid])
            os.setgid(gid)
        if entry is not None:
            os.setuid(entry.pw_uid)
    except PermissionError:
        raise AmproxyError("cannot switch to user %s / group %s: only root can" % (
            user or "-", group or "-")) from None
    log.info("dropped privileges", extra={"user": user or "", "group": group or ""})


def systemd_notify(message):
    """Send one sd_notify datagram (READY=1, RELOADING=1, STOPPING=1...) if asked to."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as e:
        log.warning("cannot notify systemd: %s", e.strerror or e,
                    extra={"notify_socket": address})
        return False
    return True


def inherited_listeners():
    """The listening sockets systemd (socket activation) or an upgraded master passed
    us, as (socket, name) pairs; names come from LISTEN_FDNAMES, if set."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)  # not for our children
    inherited = []
    for number in range(max(0, count)):
        fd = SD_LISTEN_FDS_START + number
        try:
            sock = socket.socket(fileno=fd)
        except OSError as e:
            if e.errno in (errno.ENOTSOCK, errno.EBADF):
                raise AmproxyError("LISTEN_FDS names fd %d, which is not a socket" % fd) from None
            raise
        os.set_inheritable(fd, False)
        inherited.append((sock, names[number] if number < len(names) else ""))
    return inherited
