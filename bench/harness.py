"""What bench.py and its shapes share: free ports, a counting sink in place of Carbon,
signed lines, the amproxy server under test and its CPU and memory, waiting for the
sink to settle."""

import base64
import hashlib
import hmac
import multiprocessing
import os
import selectors
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

TICKS = os.sysconf("SC_CLK_TCK")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout, what, interval=0.005):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("timed out after %.0f s waiting for %s" % (timeout, what))
        time.sleep(interval)


def port_open(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


# -- the sink -------------------------------------------------------------------

class Sink:
    """A process that counts the lines it receives and when they arrive."""

    def __init__(self):
        self.port = free_port()
        ctx = multiprocessing.get_context("fork")
        self.count = ctx.Value("q", 0, lock=False)
        self.last = ctx.Value("d", 0.0, lock=False)
        self.max_gap = ctx.Value("d", 0.0, lock=False)
        self.watch_gaps = ctx.Value("b", 0, lock=False)
        ready = ctx.Event()
        self.process = ctx.Process(target=self._serve, args=(ready,), daemon=True)
        self.process.start()
        ready.wait(10)

    def _serve(self, ready):
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        listener.setblocking(False)
        sel = selectors.DefaultSelector()
        sel.register(listener, selectors.EVENT_READ)
        buf = bytearray(1 << 20)
        count, last = self.count, self.last
        ready.set()
        while True:
            for key, _ in sel.select(0.5):
                if key.fileobj is listener:
                    try:
                        conn, _ = listener.accept()
                    except BlockingIOError:
                        continue
                    conn.setblocking(False)
                    sel.register(conn, selectors.EVENT_READ)
                    continue
                try:
                    n = key.fileobj.recv_into(buf)
                except BlockingIOError:
                    continue
                except OSError:
                    n = 0
                if not n:
                    sel.unregister(key.fileobj)
                    key.fileobj.close()
                    continue
                now = time.monotonic()
                if self.watch_gaps.value and last.value and now - last.value > self.max_gap.value:
                    self.max_gap.value = now - last.value
                count.value += buf.count(b"\n", 0, n)
                last.value = now

    def reset(self):
        self.count.value = 0
        self.last.value = 0.0
        self.max_gap.value = 0.0

    def stop(self):
        self.process.kill()
        self.process.join(5)


# -- load -------------------------------------------------------------------------

def make_keys(count, metrics_per_key):
    return [("bench%d" % k, "secret-%d-%s" % (k, "x" * 20),
             ["bench.k%d.m%d" % (k, m) for m in range(metrics_per_key)]) for k in range(count)]


def make_fleet_keys(count, metrics_per_key):
    """Keys shaped like issue 13's fleet file (100,000 x 10 is about 45 MB): one per
    device, a secret as ``amproxy keys new`` makes, and a series per sensor."""
    return [("device-%06d" % k, "%s-%06d" % ("S" * 36, k),
             ["fleet.device-%06d.temp-%d" % (k, m) for m in range(metrics_per_key)])
            for k in range(count)]


def write_auth(path, keys):
    with open(path, "w") as f:
        f.write("apikeys:\n")
        for name, secret, metrics in keys:
            f.write("  %s:\n    secret_key: %s\n    metrics:\n" % (name, secret))
            f.writelines("      - %s\n" % m for m in metrics)
    os.chmod(path, 0o600)


def generate(keys, lines, connections, bad_fraction):
    """Signed lines with timestamps of now, split into one blob per connection."""
    now = int(time.time())
    states = [(name.encode(), hmac.new(secret.encode(), digestmod=hashlib.sha256),
               [m.encode() for m in metrics]) for name, secret, metrics in keys]
    bad_every = int(round(1 / bad_fraction)) if bad_fraction else 0
    parts = [[] for _ in range(connections)]
    good = 0
    for i in range(lines):
        name, mac, metrics = states[i % len(states)]
        # Each line its own (the value is i): a device never sends the same line twice,
        # and a rate-limited key refuses a line it already had as a replay.
        text = b"%s %d %d %s" % (metrics[(i // len(states)) % len(metrics)], i, now, name)
        m = mac.copy()
        m.update(text)
        sig = base64.b64encode(m.digest())
        if bad_every and i % bad_every == 0:
            sig = sig[:-3] + (b"AA=" if sig[-3:] != b"AA=" else b"BB=")
        else:
            good += 1
        parts[i % connections].append(text + b" " + sig + b"\n")
    return [b"".join(p) for p in parts], good


def send_all(port, blobs, tls=None):
    """Send each blob over its own connection (TLS with a ``tls`` context), in parallel."""
    errors = []

    def send(blob):
        try:
            sock = socket.create_connection(("127.0.0.1", port))
            if tls is not None:
                sock = tls.wrap_socket(sock, server_hostname="127.0.0.1")
            with sock as s:
                view = memoryview(blob)
                for start in range(0, len(blob), 1 << 20):
                    s.sendall(view[start:start + (1 << 20)])
        except OSError as e:
            errors.append(e)
    threads = [threading.Thread(target=send, args=(b,)) for b in blobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


# -- the proxy under test ---------------------------------------------------------

def proc_children(pid):
    try:
        with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def cpu_seconds(pid):
    """A process's CPU time: its CPU-time clock (to the nanosecond), else /proc's
    ticks, which charge whole ticks to whoever runs at each and so misread a
    process that runs in short bursts."""
    try:
        return time.clock_gettime(((~pid) << 3) | 2)  # CPUCLOCK_SCHED of the process
    except OSError:
        pass
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS
    except OSError:
        return 0.0


def peak_rss_mb(pid):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def carbon_addr(sinks):
    """One sink as host:port; several as a cluster (one host, so each its own instance)."""
    if len(sinks) == 1:
        return "127.0.0.1:%d" % sinks[0].port
    return ",".join("127.0.0.1:%d:%s" % (sink.port, chr(ord("a") + i))
                    for i, sink in enumerate(sinks))


class Proxy:
    def __init__(self, command, sink, auth_file, workers, extra=(), sinks=None, env=None):
        self.port = free_port()
        self.tls_port = free_port()
        fields = {"addr": "127.0.0.1:%d" % self.port, "port": self.port,
                  "tls_port": self.tls_port,
                  "carbon_addr": carbon_addr(sinks or [sink]), "carbon_port": sink.port,
                  "auth_file": auth_file}
        if command is None:
            amproxy = os.path.join(os.path.dirname(sys.executable), "amproxy")
            self.argv = [amproxy, "server", "--addr", fields["addr"], "--carbon-addr",
                         fields["carbon_addr"], "--auth-file", auth_file, "--workers",
                         str(workers), "--skew", "1h", "--log-level",
                         os.environ.get("BENCH_LOG_LEVEL", "err")] + [
                             arg.format(**fields) for arg in extra]
        else:
            self.argv = shlex.split(command.format(**fields))
        self.workers = workers if command is None else None
        self.log = tempfile.TemporaryFile()
        env = dict(os.environ, AMPROXY_CONFIG="/dev/null", **(env or {}))
        notify = None
        if self.workers:
            # amproxy says READY=1 (systemd's notify protocol) once every worker
            # is up; traffic sent before that would all go to the first worker.
            notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            notify.bind(os.path.join(tempfile.mkdtemp(prefix="amproxy-bench-"), "notify"))
            env["NOTIFY_SOCKET"] = notify.getsockname()
        started = time.monotonic()
        self.process = subprocess.Popen(self.argv, stdout=self.log, stderr=self.log,
                                        start_new_session=True, env=env)
        wait_for(lambda: self.process.poll() is not None or port_open(self.port), 120,
                 "the proxy to listen")
        self.startup_seconds = time.monotonic() - started
        if self.process.poll() is not None:
            self.log.seek(0)
            raise RuntimeError("proxy exited: %s" % self.log.read().decode()[-2000:])
        if notify is not None:
            notify.settimeout(60)
            while b"READY=1" not in notify.recv(4096).split(b"\n"):
                pass
            notify.close()
            os.unlink(env["NOTIFY_SOCKET"])
            os.rmdir(os.path.dirname(env["NOTIFY_SOCKET"]))

    def pids(self):
        return [self.process.pid] + proc_children(self.process.pid)

    def cpu(self):
        return sum(cpu_seconds(pid) for pid in self.pids())

    def stop(self):
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


def settle(sinks, expected, timeout):
    """Wait until the sinks have ``expected`` lines, then a moment more for strays."""
    def counted():
        return sum(sink.count.value for sink in sinks)
    try:
        wait_for(lambda: counted() >= expected, timeout, "the sinks to count %d lines"
                 % expected, interval=0.002)
    except TimeoutError:
        pass
    end = max(sink.last.value for sink in sinks)
    time.sleep(0.2)  # catch duplicates or late lines before counting losses
    return end, counted()


# Rows of --scale-out: (name, destinations, extra flags, copies of each line).
