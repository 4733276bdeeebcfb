"""A key's rate limit holds however its connections spread over the workers."""
import time

from conftest import line_for, wait_for, write_auth
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
