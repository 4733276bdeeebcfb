"""The real ``amproxy server`` (2 workers) in front of a real carbon-cache."""
import os
import re
import signal
import socket
import subprocess
import time

from conftest import (AMPROXY, KEYS, auth_yaml, client_connections, line_for, pid_alive, wait_for,
                      wait_points, write_auth)


def test_signed_lines_from_several_keys_and_connections_reach_whisper(carbon, auth_file,
                                                                        make_proxy):
    proxy = make_proxy(carbon.address, auth_file)
    now = int(time.time())
    expected = {"e2e.alpha.temp": {}, "e2e.alpha.humidity": {}, "e2e.beta.temp": {}}
    sockets = [proxy.connect() for _ in range(6)]
    for i in range(30):
        ts = now - 60 + i
        for n, (metric, key) in enumerate([("e2e.alpha.temp", "alpha"),
                                           ("e2e.alpha.humidity", "alpha"),
                                           ("e2e.beta.temp", "beta")]):
            value = float(i * 10 + n) + 0.5
            expected[metric][ts] = value
            sockets[(i + n) % len(sockets)].sendall(line_for(KEYS, key, metric, value, ts))
    for sock in sockets:
        sock.close()
    for metric, points in expected.items():
        wait_points(carbon, metric, points, now - 60)


def test_bad_lines_are_dropped_and_the_connection_survives(carbon, auth_file, make_proxy):
    proxy = make_proxy(carbon.address, auth_file)
    now = int(time.time())
    bad = [
        b"garbage\n",
        b"\x00\xff\xfe binary \x80\n",
        line_for(KEYS, "alpha", "e2e.bad.notallowed", 1, now),      # metric not allowed
        line_for(KEYS, "alpha", "e2e.alpha.temp", 1, now - 3600),   # skew
        line_for(KEYS, "alpha", "e2e.alpha.temp", "nan", now),      # bad value
        line_for(KEYS, "alpha", "e2e.alpha.temp", 1, now).replace(b" 1 ", b" 2 ", 1),
        b"e2e.bad.unknown 1 %d nobody c2lnbmF0dXJl\n" % now,        # unknown key
        line_for({"beta": ("not-beta-secret", [])}, "beta", "e2e.beta.temp", 1, now),
    ]
    sock = proxy.connect()
    expected = {}
    for i, junk in enumerate(bad):
        sock.sendall(junk)
        ts = now - 30 + i
        expected[ts] = 100.0 + i
        sock.sendall(line_for(KEYS, "alpha", "e2e.alpha.humidity", 100 + i, ts))
    sock.close()
    wait_points(carbon, "e2e.alpha.humidity", expected, now - 30)
    assert not os.path.exists(carbon.whisper_path("e2e.bad.notallowed"))
    assert not os.path.exists(carbon.whisper_path("e2e.bad.unknown"))
    assert now - 3600 not in carbon.points("e2e.alpha.temp", now - 3700)
    assert 2.0 not in carbon.points("e2e.alpha.temp", now - 5).values()
    log = proxy.log()
    for reason in ("malformed", "metricNotAllowed", "skew", "badValue", "badSignature",
                   "unknownKey"):
        assert "reason=%s" % reason in log, reason
    assert "alpha-secret" not in log and "beta-secret" not in log


def test_final_line_without_newline_is_forwarded(carbon, auth_file, make_proxy):
    proxy = make_proxy(carbon.address, auth_file)
    now = int(time.time())
    proxy.send(line_for(KEYS, "beta", "e2e.beta.temp", 77, now - 200).rstrip(b"\n"))
    wait_points(carbon, "e2e.beta.temp", {now - 200: 77.0}, now - 200)


def send_until_stored(carbon, proxy, keys, key, metric, timeout=10):
    """Send a fresh point every 0.1 s until one is stored; return how long after the
    start the first accepted one was sent (Carbon's own write delay not included)."""
    start = time.monotonic()
    sent_at = {}

    def stored():
        value = float(len(sent_at) + 1)
        sent_at[value] = time.monotonic()
        proxy.send(line_for(keys, key, metric, value, int(time.time())))
        return carbon.points(metric, int(time.time()) - 60)
    points = wait_for(stored, timeout, interval=0.1, what="%s to be accepted" % metric)
    return sent_at[min(points.values())] - start


def test_auth_file_changes_take_effect_within_two_seconds(carbon, auth_file, make_proxy):
    proxy = make_proxy(carbon.address, auth_file)
    keys = dict(KEYS)
    # Added by an atomic rename.
    keys["gamma"] = ("gamma-secret", ["e2e.gamma.renamed"])
    write_auth(auth_file, keys, atomic=True)
    assert send_until_stored(carbon, proxy, keys, "gamma", "e2e.gamma.renamed") < 2.0
    # Added by rewriting the file in place.
    keys["delta"] = ("delta-secret", ["e2e.delta.inplace"])
    write_auth(auth_file, keys, atomic=False)
    assert send_until_stored(carbon, proxy, keys, "delta", "e2e.delta.inplace") < 2.0
    # Removed: within 2 s its lines are rejected by every worker.
    del keys["gamma"]
    write_auth(auth_file, keys)
    proxy.wait_log(r'msg="auth file reloaded".*reason="file changed"', count=6, timeout=2)
    removed_at = time.monotonic()
    for i in range(20):
        proxy.send(line_for({"gamma": ("gamma-secret", [])}, "gamma", "e2e.gamma.renamed",
                            1000 + i))
    proxy.wait_log(r"reason=unknownKey.*public_key=g\.\.\. public_key_length=5", count=20, timeout=5)
    assert time.monotonic() - removed_at < 5
    assert max(carbon.points("e2e.gamma.renamed", int(time.time()) - 30).values()) < 1000


def test_sighup_reloads_every_worker_at_once(carbon, auth_file, make_proxy):
    proxy = make_proxy(carbon.address, auth_file, args=["--auth-reload-interval", "1h"])
    keys = dict(KEYS, epsilon=("eps-secret", ["e2e.epsilon.hup"]))
    write_auth(auth_file, keys)
    proxy.signal(signal.SIGHUP)
    workers = proxy.workers()
    for pid in workers:
        proxy.wait_log(r"pid=%d .*auth file reloaded.*reason=SIGHUP" % pid, timeout=2)
    # Traffic over many connections, so both workers serve some of it.
    now = int(time.time())
    expected = {}
    for i in range(20):
        ts = now - 20 + i
        expected[ts] = float(i)
        proxy.send(line_for(keys, "epsilon", "e2e.epsilon.hup", i, ts))
    wait_points(carbon, "e2e.epsilon.hup", expected, now - 20)
    assert "reason=unknownKey" not in proxy.log()


def test_invalid_auth_file_while_running_keeps_old_keys(carbon, auth_file, make_proxy):
    proxy = make_proxy(carbon.address, auth_file)
    auth_file.write_text("apikeys:\n  broken: [\n")
    proxy.wait_log(r"level=err .*auth file .* is not valid YAML.*keeping the 2 keys", count=2)
    now = int(time.time())
    proxy.send(line_for(KEYS, "beta", "e2e.beta.temp", 55, now - 100))
    wait_points(carbon, "e2e.beta.temp", {now - 100: 55.0}, now - 100)


def test_killed_worker_is_replaced_and_traffic_goes_on(carbon, auth_file, make_proxy):
    proxy = make_proxy(carbon.address, auth_file)
    before = proxy.workers()
    os.kill(before[0], signal.SIGKILL)
    killed_at = time.monotonic()
    wait_for(lambda: len(proxy.workers()) == 2 and before[0] not in proxy.workers(), 1.0,
             interval=0.02, what="a replacement worker")
    print("worker replaced %.3f s after SIGKILL" % (time.monotonic() - killed_at))
    assert time.monotonic() - killed_at < 1.0
    now = int(time.time())
    expected = {now - 40 + i: float(i) for i in range(20)}
    for ts, value in expected.items():
        proxy.send(line_for(KEYS, "alpha", "e2e.alpha.temp", value, ts))
    wait_points(carbon, "e2e.alpha.temp", expected, now - 40)


def test_sigterm_delivers_everything_accepted_and_exits_zero(carbon, tmp_path,
                                                               make_proxy):
    metrics = ["e2e.term.m%d" % n for n in range(4)]
    keys = {"term": ("term-secret", metrics)}
    auth = tmp_path / "term.yaml"
    write_auth(auth, keys)
    proxy = make_proxy(carbon.address, auth)
    now = int(time.time())
    expected = {m: {now - 250 + i: float(i) for i in range(250)} for m in metrics}
    socks = [proxy.connect() for _ in metrics]
    for sock, metric in zip(socks, metrics):
        sock.sendall(b"".join(line_for(keys, "term", metric, v, ts)
                              for ts, v in expected[metric].items()))
    workers = proxy.workers()
    proxy.signal(signal.SIGTERM)
    assert proxy.wait_exit(40) == 0
    for sock in socks:
        sock.close()
    assert not any(pid_alive(pid) for pid in workers)
    for metric, points in expected.items():
        wait_points(carbon, metric, points, now - 250)
    assert "worker stopping with lines that Carbon has not taken" not in proxy.log()


def test_missing_auth_file_stops_with_one_clear_error(carbon, tmp_path):
    missing = tmp_path / "nope.yaml"
    result = subprocess.run([AMPROXY, "server", "--auth-file", str(missing), "--addr",
                             "127.0.0.1:0", "--carbon-addr", carbon.address],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert str(missing) in result.stderr
    assert "Traceback" not in result.stderr


def test_busy_port_is_one_clear_error(carbon, auth_file):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = subprocess.run([AMPROXY, "server", "--auth-file", str(auth_file), "--addr",
                                 "127.0.0.1:%d" % port, "--carbon-addr", carbon.address],
                                capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "127.0.0.1:%d" % port in result.stderr
    assert "Traceback" not in result.stderr


def connections_per_worker(proxy):
    return sorted(client_connections(pid, proxy.port) for pid in proxy.workers())


def test_connections_are_shared_evenly_between_the_workers(carbon, auth_file, make_proxy):
    # Left to the kernel, six connections arriving at once land 3/3 on two
    # workers less than a third of the time; an uneven split makes one worker
    # the bottleneck of a few busy clients.
    proxy = make_proxy(carbon.address, auth_file)
    sockets = [proxy.connect() for _ in range(6)]
    wait_for(lambda: connections_per_worker(proxy) == [3, 3], 3,
             what="three client connections on each worker")
    for sock in sockets[:3]:
        sock.close()
    wait_for(lambda: sum(connections_per_worker(proxy)) == 3, 3, what="three closed")
    sockets = sockets[3:] + [proxy.connect() for _ in range(3)]
    wait_for(lambda: connections_per_worker(proxy) == [3, 3], 3,
             what="the new connections to even the workers out again")
    for sock in sockets:
        sock.close()


def test_a_hung_least_loaded_worker_does_not_hold_up_new_clients(carbon, auth_file,
                                                                 make_proxy):
    proxy = make_proxy(carbon.address, auth_file)
    first = proxy.connect()
    wait_for(lambda: connections_per_worker(proxy) == [0, 1], 3, what="one connection")
    idle = next(pid for pid in proxy.workers() if client_connections(pid, proxy.port) == 0)
    os.kill(idle, signal.SIGSTOP)  # the worker that should take the next client
    try:
        now = int(time.time())
        with proxy.connect() as second:
            second.sendall(line_for(KEYS, "alpha", "e2e.alpha.temp", 42.5, now - 5))
            wait_points(carbon, "e2e.alpha.temp", {now - 5: 42.5}, now - 10, timeout=5)
    finally:
        os.kill(idle, signal.SIGCONT)
        first.close()


def test_an_auth_file_rewritten_in_place_slowly_is_not_taken_half_written(
        carbon, auth_file, make_proxy):
    """Issue 21, finding 6: a prefix cut inside a metrics list is valid YAML.  While a
    slow writer pauses half way, a device whose key is in the second half goes on."""
    keys = {"dev%03d" % i: ("dev%03d-secret" % i, ["e2e.slow.dev%03d" % i, "e2e.slow.x%03d" % i])
            for i in range(400)}
    write_auth(auth_file, keys)
    proxy = make_proxy(carbon.address, auth_file, args=["--auth-reload-interval", "0.1s"])
    new_text = auth_yaml(dict(keys, dev000=("dev000-secret", ["e2e.slow.renamed"]))).encode()
    cut = new_text.index(b"- e2e.slow.x201\n")  # inside dev201's list of metrics
    now = int(time.time())
    expected = {}

    def device_sends(value):
        ts = now - 200 + value
        expected[ts] = float(value)
        proxy.send(line_for(keys, "dev300", "e2e.slow.dev300", value, ts))
    with open(auth_file, "r+b") as writer:
        writer.truncate(0)
        writer.write(new_text[:cut])
        writer.flush()
        # The writer pauses for 0.6 s (the poll runs every 0.1 s); the device sends
        # at its start, middle and end.
        paused_at = time.monotonic()
        for value, at in enumerate((0.0, 0.3, 0.6)):
            wait_for(lambda: time.monotonic() - paused_at >= at, 2, interval=0.01,
                     what="the writer's pause")
            device_sends(value)
        writer.write(new_text[cut:])
    device_sends(199)
    proxy.wait_log(r'msg="auth file reloaded".*keys=400 .*reason="file changed"', count=2,
                   timeout=10)
    wait_points(carbon, "e2e.slow.dev300", expected, now - 200)
    assert "reason=unknownKey" not in proxy.log()
    assert not re.search(r'msg="auth file reloaded".*keys=(?!400 )', proxy.log())
