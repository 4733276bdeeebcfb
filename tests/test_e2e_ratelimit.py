"""A key's rate limit holds however its connections spread over the workers."""
import time

from conftest import line_for, wait_for, wait_points, write_auth
from test_e2e_hostile import counters
from test_e2e_proxy import connections_per_worker

RATE = 40
KEYS = {"flood": ("flood-secret", ["rate.**"]), "calm": ("calm-secret", ["rate.**"])}


def test_ten_times_the_rate_for_five_seconds_forwards_the_rate_plus_the_burst(
        carbon, make_proxy, tmp_path):
    auth = tmp_path / "auth.yaml"
    write_auth(auth, KEYS)
    auth.write_text(auth.read_text().replace("flood-secret\n", "flood-secret\n    max_rate: %d\n"
                                             % RATE, 1))
    proxy = make_proxy(carbon.address, auth, args=[
        "--stats-socket", str(tmp_path / "s.sock"), "--skew", "2h"])
    proxy.stats_socket = str(tmp_path / "s.sock")
    socks = [proxy.connect() for _ in range(4)]
    wait_for(lambda: connections_per_worker(proxy) == [2, 2], 5,
             what="the key's connections on both workers")
    seconds, start = 5.0, int(time.time()) - 3000
    sent = 0
    began = time.monotonic()
    for step in range(50):  # 10 times the rate, spread evenly over the connections
        batch = [line_for(KEYS, "flood", "rate.flood", 1, start + sent + i)
                 for i in range(int(RATE * 10 * seconds / 50))]
        socks[step % 4].sendall(b"".join(batch))
        sent += len(batch)
        time.sleep(max(0.0, began + seconds * (step + 1) / 50 - time.monotonic()))  # pacing
    # The limit applies to the time the lines took to arrive, which a busy machine stretches.
    duration = max(seconds, time.monotonic() - began)
    socks[0].sendall(line_for(KEYS, "calm", "rate.calm", 1, start))  # another key: no limit
    for sock in socks:
        sock.close()
    totals = wait_for(lambda: (lambda t: t if t["linesReceived"] == sent + 1 else None)(
        counters(proxy)), 10, what="every line counted")
    expected = RATE * duration + RATE  # the rate over the time, and one second's burst
    forwarded = totals["linesForwarded"] - 1
    assert abs(forwarded - expected) <= 0.2 * expected, (forwarded, expected)
    assert totals["rejected.rateLimited"] == sent - forwarded
    assert "reason=rateLimited" in proxy.log() and "public_key=flood" in proxy.log()


def test_a_captured_line_replayed_does_not_drain_the_devices_bucket(carbon, make_proxy,
                                                                      tmp_path):
    """Issue 21, finding 3: one captured line re-sent hundreds of times a second used up
    the bucket of a key with max_rate 2, and 7 of the device's 8 real points were lost."""
    keys = {"dev": ("dev-secret", ["replay.dev.temp"])}
    auth = tmp_path / "auth.yaml"
    write_auth(auth, keys)
    auth.write_text(auth.read_text().replace("dev-secret\n", "dev-secret\n    max_rate: 2\n"))
    proxy = make_proxy(carbon.address, auth, args=["--stats-socket", str(tmp_path / "s.sock")])
    proxy.stats_socket = str(tmp_path / "s.sock")
    now = int(time.time())
    captured = line_for(keys, "dev", "replay.dev.temp", 99, now - 100)
    attackers = [proxy.connect() for _ in range(2)]  # one on each worker, most likely
    expected = {now - 100: 99.0}
    began = time.monotonic()
    for point in range(8):  # the device: a point a second, half its rate
        wait_for(lambda: time.monotonic() - began >= point, 5, interval=0.01,
                 what="the device's next second")
        ts = now - 90 + point
        expected[ts] = float(point)
        proxy.send(line_for(keys, "dev", "replay.dev.temp", point, ts))
        for attacker in attackers:  # the attacker: the captured line, 128 times a second
            attacker.sendall(captured * 64)
    for attacker in attackers:
        attacker.close()
    wait_points(carbon, "replay.dev.temp", expected, now - 100)
    totals = wait_for(lambda: (lambda t: t if t["linesReceived"] == 8 + 8 * 128 else None)(
        counters(proxy)), 10, what="every line counted")
    assert totals["rejected.rateLimited"] == 0
    # Accepted once (twice if both workers took it at the same instant), then refused.
    assert totals["rejected.replayed"] >= 8 * 128 - 2
    assert totals["linesForwarded"] <= 8 + 2
