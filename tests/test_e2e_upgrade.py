"""Upgrading in place (SIGUSR2, the init script's restart): while 1,000 devices stream
signed lines, the port never closes, no connection is refused, and every line a
device wrote reaches a real carbon-cache."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import fleet
from amproxy import handover
from amproxy.buffer import SPOOL_ALTERNATES, Spool
from test_e2e_fleet import slow_to_read
from test_e2e_outage import make_points, outage_auth, send_steadily, wait_all_stored  # noqa: F401
from conftest import (AMPROXY, KEYS, ROOT, SECRETS_USED, children_of, free_port, line_for,
                      make_install_under, pid_alive, wait_for, wait_points, write_auth)

DEVICES = 1000
KEYS_IN_FLEET = 10
# Each line its own whisper point: line n is metric n % METRICS at a timestamp
# of its own, within the skew of the test's start.
METRICS = 100
OLDEST = 250


def fleet_keys():
    return {"up%02d" % k: ("upgrade-secret-%02d" % k, ["e2e.upgrade.*"])
            for k in range(KEYS_IN_FLEET)}


class Lines:
    """Numbered lines, each one whisper point, and what whisper must hold for them."""

    def __init__(self, keys):
        self.keys = sorted(keys.items())
        self.start = int(time.time())
        self.count = 0

    def __call__(self, device):
        n = self.count
        self.count += 1
        assert n < METRICS * 2 * OLDEST, "the stream outran its timestamps"
        name, (secret, _) = self.keys[device % len(self.keys)]
        return fleet.signed_line(secret, name, "e2e.upgrade.m%02d" % (n % METRICS), device,
                                 self.start - OLDEST + n // METRICS)

    @staticmethod
    def expected(sent):
        points = {}
        for line in sent:
            metric, value, timestamp = line.split()[:3]
            points.setdefault(metric.decode(), {})[int(timestamp)] = float(value)
        return points


def read_pid(path):
    with open(path) as f:
        return int(f.read())


def upgrade(pidfile):
    """SIGUSR2 to the master; returns once the new one wrote the pidfile and the old is gone."""
    old = read_pid(pidfile)
    os.kill(old, signal.SIGUSR2)
    new = wait_for(lambda: read_pid(pidfile) != old and read_pid(pidfile), 30,
                   what="the new master's pid in the pidfile")
    wait_for(lambda: not pid_alive(old), 40, what="the old master to exit")
    return new


def stream_through(port, carbon, upgrades):
    """1,000 devices stream while ``upgrades()`` runs; every line they wrote must
    reach whisper, and none may be refused or reset."""
    keys = fleet_keys()
    SECRETS_USED.update(secret for secret, _ in keys.values())
    lines = Lines(keys)
    stream = fleet.Stream(port, DEVICES, lines, interval=1.0).start()
    try:
        wait_for(lambda: len(stream.sent) >= 2 * DEVICES, 30, what="the fleet to stream")
        upgrades()
        sent_before = len(stream.sent)
        wait_for(lambda: len(stream.sent) >= sent_before + DEVICES, 30,
                 what="the fleet to stream to the new master")
    finally:
        stream.stop()
    assert stream.refused == 0
    assert stream.resets == 0
    assert stream.send_errors == 0
    # Every device was closed by each old master, and came back.
    assert stream.reconnects >= DEVICES
    for metric, points in Lines.expected(stream.sent).items():
        wait_points(carbon, metric, points, lines.start - OLDEST - 10, timeout=60)
    return stream


def test_usr2_twice_under_a_thousand_streaming_devices_loses_nothing(carbon, tmp_path,
                                                                      make_proxy):
    auth = tmp_path / "auth.yaml"
    write_auth(auth, fleet_keys())
    pidfile = str(tmp_path / "amproxy.pid")
    proxy = make_proxy(carbon.address, auth, args=["--pidfile", pidfile])
    masters = [read_pid(pidfile)]

    def two_upgrades():
        for _ in range(2):
            masters.append(upgrade(pidfile))

    stream_through(proxy.port, carbon, two_upgrades)
    assert len(set(masters)) == 3, masters
    # The stats socket is the new master's: the old one did not remove it as it left.
    assert stats_of(pidfile)["totals"]["linesForwarded"] > 0
    log = proxy.log()
    assert log.count("took over the sockets") == 2, log
    # The old workers drained: each said how many lines it forwarded.
    assert len(re.findall(r"\"worker stopped\" forwarded=[1-9]", log)) >= 4, log


def test_a_new_master_that_fails_leaves_the_old_one_serving(carbon, tmp_path, make_proxy,
                                                            auth_file):
    pidfile = str(tmp_path / "amproxy.pid")
    config = tmp_path / "amproxy.conf"
    config.write_text("skew = 5m\n")
    proxy = make_proxy(carbon.address, auth_file, args=["--pidfile", pidfile,
                                                        "--config", str(config)])
    old = read_pid(pidfile)
    inode = os.stat(pidfile).st_ino
    config.write_text("skew = soon\n")  # the new master refuses to start
    os.kill(old, signal.SIGUSR2)
    # Why, in the old master's log: the new one's error went to its stderr.
    proxy.wait_log(r"the new master exited with status 2; this one goes on serving\" "
                   r"new_master_pid=\d+ reason=\"amproxy server: error: argument --skew: "
                   r"'soon' is not a duration")
    # A new pidfile with the same pid: what the init script's restart waits for.
    wait_for(lambda: os.stat(pidfile).st_ino != inode, 10, what="the pidfile written again")
    assert read_pid(pidfile) == old and pid_alive(old)
    config.write_text("skew = 5m\n")
    now = int(time.time())
    proxy.send(line_for(KEYS, "alpha", "e2e.alpha.temp", 7, now))
    wait_points(carbon, "e2e.alpha.temp", {now: 7.0}, now - 10)


def test_init_script_restart_is_an_upgrade_in_place(carbon, tmp_path):
    """The init script's restart (what dpkg runs on upgrade), against a make install
    under a prefix of its own: the installed command is what starts again."""
    prefix = tmp_path / "root"
    make_install_under(prefix)
    etc = prefix / "etc"
    auth = etc / "amproxy" / "auth_file.yaml"
    write_auth(auth, fleet_keys())
    port = free_port()
    conf = etc / "amproxy" / "amproxy.conf"
    conf.write_text("addr = 127.0.0.1:%d\ncarbon-addr = %s\nauth-file = %s\nworkers = 2\n"
                    % (port, carbon.address, auth))
    pidfile = tmp_path / "run" / "amproxy.pid"
    defaults = etc / "default" / "amproxy"
    with open(defaults, "a") as f:
        f.write("RUN_AS_USER=\nPIDFILE=%s\nLOG_FILE=%s\nCONFIG_FILE=%s\nMAX_OPEN_FILES=4096\n"
                % (pidfile, tmp_path / "log" / "amproxy.log", conf))
    env = dict(os.environ, AMPROXY_DEFAULTS=str(defaults))
    for name in ("AMPROXY_CONFIG", "PYTHONPATH"):
        env.pop(name, None)

    def init(action):
        result = subprocess.run([str(etc / "init.d" / "amproxy"), action], env=env,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr

    init("start")
    masters = [read_pid(pidfile)]
    try:
        def restart():
            init("restart")  # returns once the new master serves
            masters.append(read_pid(pidfile))
            wait_for(lambda: not pid_alive(masters[0]), 40, what="the old master to exit")

        stream_through(port, carbon, restart)
        assert masters[1] != masters[0]
        init("stop")
        assert not pid_alive(masters[1])
    finally:
        for pid in masters:  # the daemons left our process group: by pid
            if pid_alive(pid):
                for child in children_of(pid):
                    os.kill(child, signal.SIGKILL)
                os.kill(pid, signal.SIGKILL)


def test_an_upgrade_while_carbon_is_down_delivers_what_the_old_workers_spooled(
        own_carbon, tmp_path, make_proxy, outage_auth):
    """The old workers spool what they hold as they stop, after the new ones opened
    their spools: the new ones adopt it, and send it once Carbon is back."""
    spool = tmp_path / "spool"
    pidfile = str(tmp_path / "amproxy.pid")
    # A stop tries Carbon until --graceful-timeout before it spools: keep it short.
    proxy = make_proxy(own_carbon.address, outage_auth, args=[
        "--skew", "2h", "--spool-dir", str(spool), "--graceful-timeout", "2s",
        "--pidfile", pidfile])  # Carbon is not running
    start = int(time.time()) - 3000
    points = make_points(4000, start)
    for sock in send_steadily(proxy, points, 1.0):
        sock.close()
    upgrade(pidfile)
    proxy.wait_log(r"found lines another worker spooled as it stopped", timeout=15)
    own_carbon.start()
    wait_all_stored(own_carbon, points, start)


def test_a_stop_during_the_handover_stops_the_new_master_too(carbon, tmp_path, make_proxy,
                                                             auth_file):
    pidfile = str(tmp_path / "amproxy.pid")
    proxy = make_proxy(carbon.address, auth_file, args=["--pidfile", pidfile])
    old = read_pid(pidfile)
    slow_to_read(auth_file)  # the new master reads it for seconds: it cannot be ready yet
    os.kill(old, signal.SIGUSR2)
    proxy.wait_log(r"starting a new master")
    new = int(re.findall(r"new_master_pid=(\d+)", proxy.log())[-1])
    os.kill(new, signal.SIGSTOP)
    try:
        os.kill(old, signal.SIGTERM)  # an admin's stop, not the new master's
        proxy.wait_log(r"stopping the new master too: it had not taken over")
    finally:
        # Stopped or not, a new master that has no SIGTERM handler yet (still starting
        # Python) dies of the old master's SIGTERM at once: Linux does not wait for SIGCONT.
        try:
            os.kill(new, signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert proxy.wait_exit(30) == 0
    wait_for(lambda: not pid_alive(new), 30, what="the new master to exit")
    assert not os.path.exists(pidfile)
    assert "took over" not in proxy.log()


def test_a_new_master_not_ready_in_time_is_stopped():
    sleeper = subprocess.Popen(["sleep", "60"])
    successor = handover.Successor()
    successor.pid = sleeper.pid
    successor._started_at = time.monotonic() - handover.READY_TIMEOUT
    successor.check_ready_in_time()
    assert sleeper.wait(10) == -signal.SIGTERM


def stats_of(pidfile):
    result = subprocess.run([AMPROXY, "stats", "--pidfile", pidfile], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_a_new_master_stopped_before_it_took_over_leaves_the_stats_socket_alone(
        carbon, tmp_path, make_proxy, auth_file):
    pidfile = str(tmp_path / "amproxy.pid")
    spool = tmp_path / "spool"
    proxy = make_proxy(carbon.address, auth_file, args=[
        "--pidfile", pidfile, "--spool-dir", str(spool), "--graceful-timeout", "1s"])
    old = read_pid(pidfile)
    # Every other spool name taken: the new master's workers wait for the old ones'
    # spools, so it binds its stats socket and is never ready.
    held = [Spool(str(spool / ("worker-%d.%d" % (slot, n))), 1 << 20).open()
            for slot in range(2) for n in range(1, SPOOL_ALTERNATES)]
    try:
        os.kill(old, signal.SIGUSR2)
        proxy.wait_log(r"starting a new master")
        new = int(re.findall(r"new_master_pid=(\d+)", proxy.log())[-1])
        wait_for(lambda: os.path.exists("%s.%d" % (tmp_path / "amproxy.stats.sock", new)), 30,
                 what="the new master's stats socket")
        os.kill(new, signal.SIGTERM)
        proxy.wait_log(r"the new master exited", timeout=30)
    finally:
        for spool_held in held:
            spool_held.close()
    assert stats_of(pidfile)["gauges"]["workers"] == 2
    assert sorted(os.listdir(str(tmp_path))).count("amproxy.stats.sock") == 1
    assert not [name for name in os.listdir(str(tmp_path)) if name.startswith(
        "amproxy.stats.sock.")]


def test_a_second_server_refuses_a_running_servers_stats_socket(carbon, tmp_path, make_proxy,
                                                                auth_file):
    socket_path = str(tmp_path / "stats.sock")
    make_proxy(carbon.address, auth_file, args=["--stats-socket", socket_path])
    second = make_proxy(carbon.address, auth_file, args=["--stats-socket", socket_path],
                        start=False).start(wait=False)
    assert second.wait_exit(30) != 0
    assert "stats socket %s belongs to a running amproxy" % socket_path in second.log()
    with socket.socket(socket.AF_UNIX) as probe:
        probe.connect(socket_path)  # the first server's, still there


# An amproxy from before upgrades in place, as far as the init script can tell: it
# detaches, writes its pidfile, stops on TERM (and says so), and dies of SIGUSR2.
OLD_DAEMON = """#!%s
import os, signal, sys, time
pidfile = sys.argv[sys.argv.index("--pidfile") + 1]
if os.fork():
    while not os.path.exists(pidfile):
        time.sleep(0.01)
    sys.exit(0)
os.setsid()
null = os.open(os.devnull, os.O_RDWR)
for fd in (0, 1, 2):
    os.dup2(null, fd)
def stop(signum, frame):
    with open(%r, "a") as f:
        f.write("TERM %%d\\n" %% os.getpid())
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
with open(pidfile + ".tmp", "w") as f:
    f.write("%%d\\n" %% os.getpid())
os.rename(pidfile + ".tmp", pidfile)
while True:
    time.sleep(1)
"""


def test_restart_of_an_amproxy_that_predates_usr2_stops_and_starts_it(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    daemon = bin_dir / "amproxy"  # its name is what start-stop-daemon matches
    stops = tmp_path / "stops"
    daemon.write_text(OLD_DAEMON % (sys.executable, str(stops)))
    daemon.chmod(0o755)
    pidfile = tmp_path / "run" / "amproxy.pid"
    defaults = tmp_path / "default"
    defaults.write_text("DAEMON=%s\nPIDFILE=%s\nLOG_FILE=%s\nCONFIG_FILE=/dev/null\n"
                        "RUN_AS_USER=\nMAX_OPEN_FILES=1024\n"
                        % (daemon, pidfile, tmp_path / "log" / "amproxy.log"))
    env = dict(os.environ, AMPROXY_DEFAULTS=str(defaults))
    script = os.path.join(ROOT, "etc", "init.d", "amproxy")

    def init(action):
        return subprocess.run([script, action], env=env, capture_output=True, text=True,
                              timeout=60)

    assert init("start").returncode == 0
    pids = [read_pid(pidfile)]
    try:
        restart = init("restart")
        assert restart.returncode == 0, restart.stdout + restart.stderr
        assert "cannot hand its port over" in restart.stderr
        pids.append(read_pid(pidfile))
        assert pids[1] != pids[0] and pid_alive(pids[1])
        # Stopped by TERM, not killed by a SIGUSR2 it does not handle.
        assert stops.read_text() == "TERM %d\n" % pids[0]
    finally:
        for pid in pids:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
