"""Self-metrics land in carbon-cache, and match the traffic sent."""
import json
import os
import subprocess
import time
import uuid

from conftest import AMPROXY, KEYS, line_for, wait_for


def total(carbon, metric, since):
    return sum(carbon.points(metric, since).values())


def test_self_metrics_reach_whisper_and_match_the_traffic(carbon, auth_file, make_proxy,
                                                          tmp_path):
    prefix = "e2e.selfstats.%s" % uuid.uuid4().hex[:8]
    stats_socket = tmp_path / "stats.sock"
    proxy = make_proxy(carbon.address, auth_file, args=[
        "--stats-interval", "1s", "--stats-prefix", prefix, "--stats-per-key",
        "--stats-socket", str(stats_socket)])
    since = int(time.time()) - 2
    now = int(time.time())
    good = [line_for(KEYS, "alpha", "e2e.alpha.temp", i, now - 100 - i) for i in range(40)]
    good += [line_for(KEYS, "beta", "e2e.beta.temp", i, now - 100 - i) for i in range(25)]
    bad = [line_for({"alpha": ("not-alpha-secret", [])}, "alpha", "e2e.alpha.temp", 1, now)] * 7
    bad += [line_for(KEYS, "beta", "e2e.not.allowed", 1, now)] * 3
    bad += [b"junk\n"] * 5
    for i in range(5):
        with proxy.connect() as sock:
            sock.sendall(b"".join(good[i::5] + bad[i::5]))
    expected = {"linesForwarded": 65, "linesReceived": 80, "rejected.badSignature": 7,
                "rejected.metricNotAllowed": 3, "rejected.malformed": 5,
                # 5 clients, and the start-up probe that waited for the port
                "connectionsOpened": 6, "keys.alpha.linesForwarded": 40,
                "keys.alpha.rejected": 7, "keys.beta.linesForwarded": 25,
                "keys.beta.rejected": 3}

    def all_counted():
        return all(total(carbon, "%s.%s" % (prefix, name), since) == value
                   for name, value in expected.items())
    try:
        wait_for(all_counted, 20, interval=0.5, what="the self-metrics")
    except TimeoutError:
        got = {name: total(carbon, "%s.%s" % (prefix, name), since) for name in expected}
        raise AssertionError("self-metrics %r, expected %r" % (got, expected)) from None
    assert max(carbon.points("%s.workers" % prefix, since).values()) == 2
    assert total(carbon, "%s.droppedLines" % prefix, since) == 0
    assert os.path.exists(carbon.whisper_path("%s.rejected.skew" % prefix))
    # `amproxy stats` reads the same totals from the running server.
    result = subprocess.run([AMPROXY, "stats", "--stats-socket", str(stats_socket)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["totals"]["linesForwarded"] == 65
    assert stats["totals"]["rejected.badSignature"] == 7
    assert stats["gauges"]["workers"] == 2
    assert stats["keys"]["alpha"] == {"linesForwarded": 40, "rejected": 7}


def test_stats_through_the_pidfile(carbon, auth_file, make_proxy, tmp_path):
    pidfile = tmp_path / "amproxy.pid"
    proxy = make_proxy(carbon.address, auth_file, args=["--pidfile", str(pidfile)])
    proxy.send(line_for(KEYS, "beta", "e2e.beta.temp", 5, int(time.time()) - 30))

    def forwarded():
        result = subprocess.run([AMPROXY, "stats", "--pidfile", str(pidfile)],
                                capture_output=True, text=True, timeout=30)
        return result.returncode == 0 and json.loads(
            result.stdout)["totals"]["linesForwarded"] == 1
    wait_for(forwarded, 10, interval=0.3, what="stats through the pidfile")
