import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

from devcarbon import CarbonCache, free_port, port_open, wait_for  # noqa: E402

from amproxy.protocol import signed_line  # noqa: E402

AMPROXY = os.path.join(os.path.dirname(sys.executable), "amproxy")
# Nothing the tests run may read this host's /etc/amproxy/amproxy.conf: an
# explicit config replaces it (a test that wants a config passes --config,
# which beats this).
os.environ["AMPROXY_CONFIG"] = "/dev/null"

KEYS = {
    "alpha": ("alpha-secret", ["e2e.alpha.temp", "e2e.alpha.humidity"]),
    "beta": ("beta-secret", ["e2e.beta.temp"]),
}


def auth_yaml(keys):
    lines = ["apikeys:"]
    for name, (secret, metrics) in keys.items():
        lines.append("  %s:" % name)
        lines.append("    secret_key: %s" % secret)
        lines.append("    metrics:")
        lines.extend("      - %s" % m for m in metrics)
    return "\n".join(lines) + "\n"


def write_auth(path, keys, atomic=True):
    SECRETS_USED.update(secret for secret, _ in keys.values())
    text = auth_yaml(keys)
    if atomic:
        tmp = str(path) + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o600)
        os.rename(tmp, path)
    else:
        with open(path, "w") as f:
            f.write(text)


# Every secret the tests sign with; no amproxy log may ever contain one.
SECRETS_USED = set()
# A base64 HMAC-SHA256: 43 characters and one "=". No log line may hold one,
# whether a client's signature or one the proxy computed.
SIGNATURE_SHAPE = re.compile(r"(?<![A-Za-z0-9+/])[A-Za-z0-9+/]{43}=")


def line_for(keys, public_key, metric, value, timestamp=None):
    SECRETS_USED.add(keys[public_key][0])
    return signed_line(keys[public_key][0], metric, value,
                       int(time.time()) if timestamp is None else timestamp, public_key)


def assert_log_leaks_nothing(text, where):
    for secret in SECRETS_USED:
        assert secret not in text, "a secret key appears in %s" % where
    match = SIGNATURE_SHAPE.search(text)
    assert match is None, "a signature (%s) appears in %s" % (match.group(0), where)


def _processes():
    """(pid, the fields of /proc/PID/stat after the command name) of every live process."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z":
            yield int(entry), fields


def children_of(pid):
    """The pids whose parent is ``pid``, read from /proc."""
    return sorted(child for child, fields in _processes() if int(fields[1]) == pid)


def make_install_under(prefix, **variables):
    """make install under ``prefix`` for this interpreter, with no daemon user."""
    settings = dict({"PREFIX": "%s/usr" % prefix, "SYSCONFDIR": "%s/etc" % prefix,
                     "SYSTEMD_UNIT_DIR": "%s/lib/systemd" % prefix,
                     "INSTALL_PYTHON": sys.executable, "CREATE_USER": "no"}, **variables)
    subprocess.run(["make", "-C", ROOT, "install"] + ["%s=%s" % item for item in settings.items()],
                   check=True, capture_output=True, timeout=300)


def client_connections(pid, port):
    """How many established TCP connections to local ``port`` process ``pid`` holds."""
    inodes = set()
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            target = os.readlink("/proc/%d/fd/%s" % (pid, fd))
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    with open("/proc/net/tcp") as f:
        next(f)
        for row in f:
            fields = row.split()
            local_port = int(fields[1].split(":")[1], 16)
            if local_port == port and fields[3] == "01" and fields[9] in inodes:
                count += 1
    return count


def process_group(pgid):
    """The live processes of process group ``pgid``, read from /proc."""
    return [pid for pid, fields in _processes() if int(fields[2]) == pgid]


def stop_process_group(pgid, timeout=40):
    """SIGTERM to a group this test started; SIGKILL what is left after ``timeout``."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        try:
            wait_for(lambda: not process_group(pgid), wait, what="process group to stop")
            return
        except TimeoutError:
            continue


def pid_alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


# The master's debug line for each worker it forks, in logfmt or JSON.
WORKER_STARTED = re.compile(r'worker started"?,? .*?worker_pid"?[=:] ?(\d+)')


class Proxy:
    """A real ``amproxy server`` process in its own session, logging to a file."""

    def __init__(self, tmp_path, carbon_address, auth_file, args=(), env=None, workers=2):
        self.port = free_port()
        self.log_path = os.path.join(str(tmp_path), "amproxy-%d.log" % self.port)
        self.args = [AMPROXY, "server", "--addr", "127.0.0.1:%d" % self.port,
                     "--carbon-addr", carbon_address, "--auth-file", str(auth_file),
                     "--log-level", "debug"] + list(args)
        if workers is not None:
            self.args += ["--workers", str(workers)]
        self.expected_workers = workers
        self.env = dict(os.environ, **(env or {}))
        self.process = None

    def start(self, wait=True):
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.args, stdout=log, stderr=log,
                                            stdin=subprocess.DEVNULL, env=self.env,
                                            start_new_session=True)
        if wait:
            wait_for(lambda: self.process.poll() is not None or port_open(self.port), 15,
                     what="amproxy to listen")
            assert self.process.poll() is None, self.log()
            if self.expected_workers:
                self.wait_workers(self.expected_workers)
        return self

    @property
    def pid(self):
        return self.process.pid

    @property
    def address(self):
        return ("127.0.0.1", self.port)

    def workers(self):
        """The master's workers: its children that its log says it started as workers
        (a child compiling the auth file is not one), or all of them without that log."""
        started = {int(pid) for pid in WORKER_STARTED.findall(self.log())}
        children = children_of(self.pid)
        return [pid for pid in children if pid in started] if started else children

    def wait_workers(self, count, timeout=10):
        return wait_for(lambda: len(self.workers()) == count and self.workers(), timeout,
                        what="%d workers" % count)

    def log(self):
        paths = [self.log_path]
        if "--log-file" in self.args:
            paths.append(self.args[self.args.index("--log-file") + 1])
        text = []
        for path in paths:
            try:
                with open(path, errors="replace") as f:
                    text.append(f.read())
            except FileNotFoundError:
                pass
        return "".join(text)

    def wait_log(self, pattern, count=1, timeout=10):
        regex = re.compile(pattern)
        return wait_for(lambda: len(regex.findall(self.log())) >= count, timeout,
                        what="%d log lines matching %r" % (count, pattern))

    def connect(self):
        return socket.create_connection(self.address, timeout=5)

    def send(self, data):
        with self.connect() as sock:
            sock.sendall(data)

    def signal(self, sig):
        os.kill(self.pid, sig)

    def wait_exit(self, timeout=60):
        return self.process.wait(timeout)

    def stop(self):
        """Stop the server (if running) and check its whole log for leaks."""
        self._terminate()
        if self.process is not None:
            assert_log_leaks_nothing(self.log(), self.log_path)

    def _terminate(self):
        if self.process is None:
            return
        if self.process.poll() is not None:
            stop_process_group(self.process.pid)  # a master started by SIGUSR2 lives on
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(40)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="session")
def carbon(tmp_path_factory):
    cache = CarbonCache(str(tmp_path_factory.mktemp("carbon"))).start()
    yield cache
    cache.stop()


@pytest.fixture
def own_carbon(tmp_path):
    """A carbon-cache for tests that stop and start it."""
    cache = CarbonCache(str(tmp_path / "carbon"))
    yield cache
    cache.stop()


@pytest.fixture
def auth_file(tmp_path):
    path = tmp_path / "auth_file.yaml"
    write_auth(path, KEYS)
    return path


@pytest.fixture
def make_proxy(tmp_path):
    """Build (and by default start) amproxy servers; all are stopped at teardown."""
    made = []

    def make(carbon_address, auth_file, args=(), env=None, workers=2, start=True):
        proxy = Proxy(tmp_path, carbon_address, auth_file, args, env, workers)
        made.append(proxy)
        return proxy.start() if start else proxy

    yield make
    for proxy in made:
        proxy.stop()


def wait_points(carbon, metric, expected, since, timeout=15):
    """Wait until whisper holds every (timestamp -> value) in ``expected``."""
    def done():
        points = carbon.points(metric, since)
        return all(points.get(ts) == value for ts, value in expected.items())
    try:
        wait_for(done, timeout, interval=0.2, what="points of %s" % metric)
    except TimeoutError:
        got = carbon.points(metric, since)
        missing = {ts: v for ts, v in expected.items() if got.get(ts) != v}
        raise AssertionError("%s: %d of %d points missing, e.g. %r" % (
            metric, len(missing), len(expected), list(missing.items())[:5])) from None
