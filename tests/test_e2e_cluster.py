"""amproxy as the relay tier of a Graphite cluster: three real carbon-caches.

Where each series must live comes from carbon's own router (the oracle), not
from amproxy's code.
"""
import os
import threading
import time

import pytest
from carbon.routers import ConsistentHashingRouter

from conftest import line_for, wait_for, write_auth
from devcarbon import CarbonCache
from test_e2e_hostile import counters
from test_e2e_outage import send_steadily

METRICS = ["cluster.dev%d.sensor%02d" % (d, s) for d in range(3) for s in range(20)]
KEYS = {"dev": ("dev-secret", ["cluster.**"])}


class Settings(dict):
    __getattr__ = dict.__getitem__


@pytest.fixture
def caches(tmp_path):
    started = []
    try:
        for instance in "abc":
            started.append(CarbonCache(str(tmp_path / ("carbon-" + instance))).start())
        yield dict(zip("abc", started))
    finally:
        for cache in started:
            cache.stop()


@pytest.fixture
def cluster_auth(tmp_path):
    path = tmp_path / "cluster.yaml"
    write_auth(path, KEYS)
    return path


def destinations(caches):
    return ",".join("%s:%s" % (cache.address, instance) for instance, cache in caches.items())


def carbon_placement(caches, replication, diverse):
    """{metric: set of instances} as carbon's router places it."""
    router = ConsistentHashingRouter(Settings(
        REPLICATION_FACTOR=replication, DIVERSE_REPLICAS=diverse, ROUTER_HASH_TYPE=None))
    for instance, cache in caches.items():
        router.addDestination(("127.0.0.1", cache.line_port, instance))
    return {m: {d[2] for d in router.getDestinations(m)} for m in METRICS}


def holders(caches, metric):
    return {i for i, cache in caches.items() if os.path.exists(cache.whisper_path(metric))}


def check_placement(caches, expected):
    wait_for(lambda: all(holders(caches, m) >= expected[m] for m in METRICS), 20,
             interval=0.2, what="every metric on the caches carbon's router names")
    # A line sent to a wrong cache would show up at about the same time: watch a while.
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        wrong = {m: holders(caches, m) for m in METRICS if holders(caches, m) != expected[m]}
        assert not wrong, wrong
        time.sleep(0.2)  # polling for 2 s for files that must not appear


@pytest.mark.parametrize("replication, diverse", [(1, "true"), (2, "false")])
def test_each_series_is_on_exactly_the_caches_carbons_router_names(
        caches, cluster_auth, make_proxy, replication, diverse):
    expected = carbon_placement(caches, replication, diverse == "true")
    assert {len(v) for v in expected.values()} == {replication}
    assert len({i for v in expected.values() for i in v}) == 3  # all three are used
    proxy = make_proxy(destinations(caches), cluster_auth, args=[
        "--replication-factor", str(replication), "--diverse-replicas", diverse])
    now = int(time.time())
    with proxy.connect() as sock:
        sock.sendall(b"".join(line_for(KEYS, "dev", m, 1.5, now) for m in METRICS))
    check_placement(caches, expected)


def test_one_cache_down_for_ten_seconds_loses_nothing_and_the_others_keep_receiving(
        caches, cluster_auth, make_proxy, tmp_path):
    expected = carbon_placement(caches, 1, True)
    proxy = make_proxy(destinations(caches), cluster_auth, args=[
        "--skew", "2h", "--stats-socket", str(tmp_path / "stats.sock")])
    proxy.stats_socket = str(tmp_path / "stats.sock")
    down = caches["b"]
    start = int(time.time()) - 3000
    per_metric = 250
    points = [(m, start + i, float(i)) for i in range(per_metric) for m in METRICS]
    during = {}  # what the running caches held while b was down

    def outage():
        time.sleep(2.0)  # pacing: the stream is under way
        down.stop()
        time.sleep(4.0)  # pacing: part of the outage has passed
        during["first"] = stored_per_cache(caches, expected, start)
        time.sleep(6.0)  # pacing: the rest of the 10 s outage
        during["last"] = stored_per_cache(caches, expected, start)
        down.start()

    cycler = threading.Thread(target=outage)
    cycler.start()
    socks = send_steadily(proxy, [(m, ts, v) for m, ts, v in points], 14.0)
    cycler.join(60)
    for sock in socks:
        sock.close()
    # During the outage, the two running caches kept receiving.
    for instance in "ac":
        assert during["last"][instance] > during["first"][instance] > 0, during
    # After it, every point is on its cache: nothing lost anywhere.
    def missing():
        stored = {m: caches[next(iter(expected[m]))].points(m, start) for m in METRICS}
        return [(m, ts) for m, ts, v in points if stored[m].get(ts) != v]
    try:
        wait_for(lambda: not missing(), 60, interval=0.5, what="every point on its cache")
    except TimeoutError:
        raise AssertionError("%d points lost, e.g. %r" % (len(missing()), missing()[:3])) from None
    # Self-metrics name each destination (workers report once a second).
    sent = ["destinations.127_0_0_1_%d_%s.linesSent" % (caches[i].line_port, i) for i in "abc"]
    totals = wait_for(lambda: (lambda t: t if sum(t[n] for n in sent) >= len(points) else None)(
        counters(proxy)), 10, what="every line counted as sent")
    assert totals["destinations.127_0_0_1_%d_b.carbonReconnects" % down.line_port] >= 1


def stored_per_cache(caches, expected, since):
    """How many points each cache holds of the metrics placed on it."""
    return {i: sum(len(cache.points(m, since)) for m in METRICS if i in expected[m])
            for i, cache in caches.items()}
