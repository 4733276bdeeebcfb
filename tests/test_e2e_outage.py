"""No valid line is lost: Carbon outages, restarts and crashes, with a real carbon-cache."""
import os
import signal
import threading
import time

import pytest

from conftest import line_for, pid_alive, wait_for, write_auth
from test_e2e_hostile import counters

METRICS = ["outage.m%02d" % i for i in range(20)]
KEYS = {"dev": ("dev-secret", METRICS)}


@pytest.fixture
def outage_auth(tmp_path):
    path = tmp_path / "outage.yaml"
    write_auth(path, KEYS)
    return path


def make_points(count, start):
    """``count`` distinct (metric, timestamp, value) points, spread over METRICS."""
    per_metric = count // len(METRICS)
    return [(metric, start + i, float(n * 100000 + i))
            for n, metric in enumerate(METRICS) for i in range(per_metric)]


def send_steadily(proxy, points, seconds, connections=4):
    """Send ``points`` over ``connections`` at an even rate for ``seconds``."""
    socks = [proxy.connect() for _ in range(connections)]
    batches = 100
    per_batch = (len(points) + batches - 1) // batches
    started = time.monotonic()
    for b in range(batches):
        chunk = points[b * per_batch:(b + 1) * per_batch]
        data = b"".join(line_for(KEYS, "dev", m, v, ts) for m, ts, v in chunk)
        socks[b % connections].sendall(data)
        pause = started + seconds * (b + 1) / batches - time.monotonic()
        if pause > 0:
            time.sleep(pause)  # pacing the load, not waiting for a result
    return socks


def missing_points(carbon, points, since):
    stored = {m: carbon.points(m, since) for m in METRICS}
    return [(m, ts, v) for m, ts, v in points if stored[m].get(ts) != v]


def wait_all_stored(carbon, points, since, timeout=60):
    try:
        wait_for(lambda: not missing_points(carbon, points, since), timeout, interval=0.5,
                 what="every point in whisper")
        print("sent %d lines, %d of them in whisper" % (
            len(points), len(points) - len(missing_points(carbon, points, since))))
    except TimeoutError:
        missing = missing_points(carbon, points, since)
        raise AssertionError("%d of %d points never reached whisper, e.g. %r" % (
            len(missing), len(points), missing[:3])) from None


def run_outage(own_carbon, proxy, points, seconds=10.0, outage=(2.0, 12.0)):
    """Stream ``points`` for ``seconds`` while Carbon is down during ``outage``."""
    def cycle_carbon():
        time.sleep(outage[0])
        own_carbon.stop()
        time.sleep(outage[1] - outage[0])
        own_carbon.start()
    cycler = threading.Thread(target=cycle_carbon)
    cycler.start()
    socks = send_steadily(proxy, points, seconds)
    cycler.join(60)
    for sock in socks:
        sock.close()


def test_carbon_down_for_ten_seconds_loses_nothing(own_carbon, outage_auth, make_proxy,
                                                   tmp_path):
    own_carbon.start()
    proxy = make_proxy(own_carbon.address, outage_auth, args=["--skew", "2h"])
    start = int(time.time()) - 3000
    points = make_points(20000, start)
    run_outage(own_carbon, proxy, points)
    wait_all_stored(own_carbon, points, start)
    log = proxy.log()
    assert "lost the connection to Carbon" in log
    assert "Carbon connection restored" in log
    # The outage is logged once per worker, not once per line.
    assert log.count("keeping lines until it is back") <= 2


def test_long_outage_overflows_into_the_spool(own_carbon, outage_auth, make_proxy,
                                              tmp_path):
    own_carbon.start()
    spool = tmp_path / "spool"
    # 4,000 lines per worker: less than the 8,000 that a worker serving two of
    # the four connections queues during the outage, so it spills; more than the
    # 3,000 it can send before the outage, so the resend window covers what
    # carbon-cache loses when it is stopped.  (A smaller buffer shortens the
    # resend window; amproxy then logs that it "cannot hold --resend-window".)
    proxy = make_proxy(own_carbon.address, outage_auth,
                       args=["--skew", "2h", "--buffer-size", "4000",
                             "--spool-dir", str(spool), "--replay-rate", "20000"])
    start = int(time.time()) - 3000
    points = make_points(20000, start)
    run_outage(own_carbon, proxy, points)
    wait_all_stored(own_carbon, points, start)
    assert "spilling lines to the spool" in proxy.log()
    wait_for(lambda: proxy.log().count("backlog delivered to Carbon") >= 1, 10,
             what="the end of the backlog to be logged")
    wait_for(lambda: not any(f.endswith(".spool") for _, _, files in os.walk(spool)
                             for f in files), 10, what="the spool to empty")


def test_sigterm_while_carbon_is_down_then_restart_delivers_everything(
        own_carbon, outage_auth, make_proxy, tmp_path):
    spool = tmp_path / "spool"
    # A stop tries Carbon until --graceful-timeout before it spools: keep it short.
    args = ["--skew", "2h", "--spool-dir", str(spool), "--graceful-timeout", "2s"]
    first = make_proxy(own_carbon.address, outage_auth, args=args)  # Carbon is not running
    start = int(time.time()) - 3000
    points = make_points(10000, start)
    socks = send_steadily(first, points, 2.0)
    first.signal(signal.SIGTERM)
    assert first.wait_exit(40) == 0
    for sock in socks:
        sock.close()
    spooled = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(spool)
                  for f in files if f.endswith(".spool"))
    assert spooled > 0
    assert "they are lost" not in first.log()
    own_carbon.start()
    second = make_proxy(own_carbon.address, outage_auth, args=args)
    wait_all_stored(own_carbon, points, start)
    assert "found spooled lines" in second.log()


def spooled_lines(spool):
    found = []
    for directory, _, files in os.walk(spool):
        for name in sorted(files):
            if name.endswith(".spool"):
                with open(os.path.join(directory, name), "rb") as f:
                    found.extend(f.read().splitlines())
    return found


def test_killed_worker_spool_is_delivered_by_its_successor(own_carbon, outage_auth,
                                                           make_proxy, tmp_path):
    spool = tmp_path / "spool"
    proxy = make_proxy(own_carbon.address, outage_auth, workers=1,
                       args=["--skew", "2h", "--spool-dir", str(spool),
                             "--buffer-size", "100"])
    start = int(time.time()) - 3000
    points = make_points(4000, start)
    with proxy.connect() as sock:
        sock.sendall(b"".join(line_for(KEYS, "dev", m, v, ts) for m, ts, v in points))
        wait_for(lambda: len(spooled_lines(spool)) >= 3800, 10, what="lines in the spool")
    worker = proxy.workers()[0]
    os.kill(worker, signal.SIGKILL)
    in_spool = spooled_lines(spool)
    # What was in the killed worker's memory is lost; what it had spooled is not.
    assert len(in_spool) >= 3800
    proxy.wait_workers(1)
    own_carbon.start()
    expected = []
    for line in in_spool:
        metric, value, ts = line.decode().split()
        expected.append((metric, int(ts), float(value)))
    wait_all_stored(own_carbon, expected, start)


def test_workers_exit_within_two_seconds_of_the_master_dying(carbon, outage_auth,
                                                             make_proxy):
    proxy = make_proxy(carbon.address, outage_auth)
    workers = proxy.workers()
    client = proxy.connect()  # an open client must not keep them alive
    os.kill(proxy.pid, signal.SIGKILL)
    killed = time.monotonic()
    wait_for(lambda: not any(pid_alive(pid) for pid in workers), 2.0, interval=0.02,
             what="the workers to exit")
    elapsed = time.monotonic() - killed
    client.close()
    print("workers exited %.2f s after the master was killed" % elapsed)
    assert elapsed < 2.0


def test_hung_worker_is_killed_and_replaced(carbon, outage_auth, make_proxy):
    proxy = make_proxy(carbon.address, outage_auth, args=["--worker-timeout", "2s"])
    hung = proxy.workers()[0]
    os.kill(hung, signal.SIGSTOP)
    wait_for(lambda: hung not in proxy.workers() and len(proxy.workers()) == 2, 6,
             what="the hung worker to be replaced")
    assert "worker hung" in proxy.log()


def test_a_stop_without_a_spool_waits_for_carbon_to_come_back(own_carbon, outage_auth,
                                                               make_proxy, tmp_path):
    """No spool: what the workers hold must reach Carbon if it returns within the timeout."""
    stats = str(tmp_path / "stats.sock")
    proxy = make_proxy(own_carbon.address, outage_auth,  # Carbon is not running
                       args=["--skew", "2h", "--stats-socket", stats])
    proxy.stats_socket = stats
    start = int(time.time()) - 3000
    points = make_points(400, start)
    with proxy.connect() as sock:
        sock.sendall(b"".join(line_for(KEYS, "dev", m, v, ts) for m, ts, v in points))
        wait_for(lambda: counters(proxy)["linesForwarded"] == 400, 10,
                 what="the lines to be accepted")
    proxy.signal(signal.SIGTERM)
    time.sleep(1.0)  # the scenario: Carbon comes back a second after the stop began
    own_carbon.start()
    assert proxy.wait_exit(40) == 0
    wait_all_stored(own_carbon, points, start)
    assert "they are lost" not in proxy.log()


def test_idle_clients_and_a_half_line_do_not_hold_up_a_stop(carbon, outage_auth, make_proxy,
                                                            tmp_path):
    stats = str(tmp_path / "stats.sock")
    proxy = make_proxy(carbon.address, outage_auth, args=["--skew", "2h",
                                                          "--stats-socket", stats])
    proxy.stats_socket = stats
    start = int(time.time()) - 3000
    points = make_points(200, start)
    idle = [proxy.connect() for _ in range(5)]
    half = proxy.connect()
    half.sendall(b"".join(line_for(KEYS, "dev", m, v, ts) for m, ts, v in points) +
                 b"outage.m00 1 ")
    wait_for(lambda: counters(proxy)["linesForwarded"] == 200, 10,
             what="the complete lines to be read")
    stopped = time.monotonic()
    proxy.signal(signal.SIGTERM)
    assert proxy.wait_exit(10) == 0
    elapsed = time.monotonic() - stopped
    print("stopped %.2f s after TERM with 5 idle clients and a half line" % elapsed)
    assert elapsed < 3.0
    for sock in idle + [half]:
        sock.close()
    wait_all_stored(carbon, points, start)
    assert "did not finish its line" in proxy.log()
