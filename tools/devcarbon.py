"""A throwaway carbon-cache on 127.0.0.1, for the tests, the benchmark and ``make run``.

It runs the real carbon-cache from PyPI (carbon 1.1.10, Python 3.11) from
the same virtualenv as this interpreter, with its storage in a directory of
its own and one-second retention so points can be read back at once.
"""

import os
import random
import signal
import socket
import subprocess
import sys
import time

CARBON_CONF = """\
[cache]
STORAGE_DIR = {storage}
LOCAL_DATA_DIR = {storage}/whisper
WHITELISTS_DIR = {storage}/lists
LOG_DIR = {storage}/log
PID_DIR = {storage}
ENABLE_LOGROTATION = False
USER =
LINE_RECEIVER_INTERFACE = 127.0.0.1
LINE_RECEIVER_PORT = {line_port}
ENABLE_UDP_LISTENER = False
PICKLE_RECEIVER_INTERFACE = 127.0.0.1
PICKLE_RECEIVER_PORT = {pickle_port}
CACHE_QUERY_INTERFACE = 127.0.0.1
CACHE_QUERY_PORT = {query_port}
ENABLE_TAGS = False
CARBON_METRIC_INTERVAL = 0
MAX_CACHE_SIZE = inf
MAX_UPDATES_PER_SECOND = inf
MAX_CREATES_PER_MINUTE = inf
LOG_LISTENER_CONNECTIONS = False
LOG_UPDATES = False
LOG_CREATES = False
"""

STORAGE_SCHEMAS = """\
[everything]
pattern = .*
retentions = 1s:1d
"""


def free_port():
    """A port free on 127.0.0.1, below the kernel's ephemeral range (32768 and up):
    a port from that range may be taken by an outgoing connection (a storm's, a
    client's) before the server that was given it binds it."""
    low, high = 10000, 32767
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            high = min(high, int(f.read().split()[0]) - 1)
    except (OSError, ValueError, IndexError):
        pass
    for _ in range(100):
        port = random.randint(low, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout, interval=0.05, what="condition"):
    """Poll ``predicate`` until it returns a true value or ``timeout`` s pass."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError("timed out after %.1f s waiting for %s" % (timeout, what))
        time.sleep(interval)


def port_open(port, host="127.0.0.1"):
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def stop_group_of(process, timeout=20):
    """SIGTERM to the group ``process`` leads (a Popen started in a session of its own),
    SIGKILL after ``timeout``, and wait for it."""
    if process is None or process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout)
    except ProcessLookupError:
        pass


class CarbonCache:
    def __init__(self, directory, line_port=None):
        self.directory = os.path.abspath(directory)
        self.storage = os.path.join(self.directory, "storage")
        self.whisper_dir = os.path.join(self.storage, "whisper")
        self.line_port = line_port or free_port()
        self.process = None
        self.log_path = os.path.join(self.directory, "carbon-cache.out")
        os.makedirs(self.whisper_dir, exist_ok=True)
        with open(os.path.join(self.directory, "carbon.conf"), "w") as f:
            f.write(CARBON_CONF.format(storage=self.storage, line_port=self.line_port,
                                       pickle_port=free_port(), query_port=free_port()))
        with open(os.path.join(self.directory, "storage-schemas.conf"), "w") as f:
            f.write(STORAGE_SCHEMAS)

    @property
    def address(self):
        return "127.0.0.1:%d" % self.line_port

    def start(self, timeout=30):
        script = os.path.join(os.path.dirname(sys.executable), "carbon-cache.py")
        # A pidfile left by a SIGTERMed run would make carbon-cache refuse to start.
        pidfile = os.path.join(self.storage, "carbon-cache-a.pid")
        if os.path.exists(pidfile):
            os.unlink(pidfile)
        out = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, script, "--config=%s" % os.path.join(self.directory, "carbon.conf"),
             "--nodaemon", "start"], stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True)
        out.close()
        wait_for(lambda: self.process.poll() is not None or port_open(self.line_port),
                 timeout, what="carbon-cache to listen on %d" % self.line_port)
        if self.process.poll() is not None:
            raise RuntimeError("carbon-cache exited at start; see %s" % self.log_path)
        return self

    def stop(self, timeout=20):
        """SIGTERM (carbon-cache exits -15 even when it stops cleanly) and wait."""
        stop_group_of(self.process, timeout)

    def whisper_path(self, metric):
        return os.path.join(self.whisper_dir, *metric.split(".")) + ".wsp"

    def points(self, metric, since=0):
        """{timestamp: value} stored for ``metric`` from ``since`` on ({} if none yet)."""
        import whisper
        path = self.whisper_path(metric)
        if not os.path.exists(path):
            return {}
        try:
            (start, _end, step), values = whisper.fetch(path, since - 1, time.time() + 1)
        except (whisper.WhisperException, OSError):
            return {}
        return {start + i * step: v for i, v in enumerate(values) if v is not None}
