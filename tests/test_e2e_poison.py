"""Signed lines that Carbon would choke on or file elsewhere, against a real carbon-cache.

Each line here is correctly signed by a key that exists: the signature is
not what stops it.  What must hold: Carbon's connection never breaks, a key
writes only inside its own namespace, and no worker dies.
"""
import hashlib
import os
import random
import time

import pytest

from amproxy.auth import load_auth_file
from amproxy.deadletter import DEAD_LETTER_FILE
from amproxy.protocol import check_line, sign
from carbon.util import TaggedSeries
from conftest import SECRETS_USED, pid_alive, wait_for, wait_points, write_auth
from test_e2e_hostile import counters, rss_bytes


def namespace():
    return "ns%d" % random.randrange(10 ** 9)


def keys_for(ns):
    keys = {
        "dev1": ("dev1-secret", ["%s.dev1.**" % ns]),
        "home": ("home-secret", ["%s.home.*.temp" % ns]),
        "bob": ("bob-secret", ["%s.home.bob.kitchen.**" % ns]),
        "trail": ("trail-secret", ["%s.trail.*" % ns]),
    }
    SECRETS_USED.update(secret for secret, _ in keys.values())
    return keys


@pytest.fixture
def ns():
    return namespace()


@pytest.fixture
def keys(ns):
    return keys_for(ns)


@pytest.fixture
def start_proxy(make_proxy, keys, tmp_path):
    """An amproxy server with the namespace's keys and a stats socket for ``counters``."""
    auth = tmp_path / "auth.yaml"
    write_auth(auth, keys)

    def start(carbon, *args, workers=2):
        stats_socket = str(tmp_path / "stats.sock")
        proxy = make_proxy(carbon.address, auth, workers=workers,
                           args=list(args) + ["--stats-socket", stats_socket])
        proxy.stats_socket = stats_socket
        return proxy
    return start


def signed(keys, public_key, metric, value=b"1", timestamp=None):
    """A correctly signed wire line for any bytes in the three data fields."""
    if timestamp is None:
        timestamp = b"%d" % time.time()
    text = b" ".join([_b(metric), _b(value), _b(timestamp), public_key.encode()])
    return text + b" " + sign(keys[public_key][0], text).encode() + b"\n"


def _b(field):
    return field.encode("utf-8") if isinstance(field, str) else field


def whisper_series(carbon, ns):
    """Every series carbon stored under the namespace, as dotted names."""
    found = set()
    root = os.path.join(carbon.whisper_dir, ns)
    for directory, _, files in os.walk(root):
        for name in files:
            path = os.path.relpath(os.path.join(directory, name), carbon.whisper_dir)
            found.add(path[:-len(".wsp")].replace(os.sep, "."))
    return found


def tagged_path(carbon, metric):
    """Where carbon (TAG_HASH_FILENAMES, the default) stores a tagged series."""
    path = TaggedSeries.parse(metric).path
    digest = hashlib.sha256(path.encode("utf-8")).hexdigest()
    return os.path.join(carbon.whisper_dir, "_tagged", digest[:3], digest[3:6], digest + ".wsp")


def bad_lines(keys, ns):
    """(public key, metric) pairs that today's checks pass and Carbon mishandles."""
    dev1 = "%s.dev1." % ns
    cases = [("dev1", dev1.encode() + b"\xff"),                  # carbon cannot decode it
             ("dev1", dev1 + "x" * 17000),                       # over carbon's line limit
             ("dev1", dev1 + "x;tag=v"),                         # a tagged series
             ("dev1", dev1 + 'om{a="b"}'),                       # an OpenMetrics name
             ("dev1", dev1 + "*"),                               # a glob, stored literally
             ("dev1", dev1 + "a\x00b"),
             ("dev1", dev1 + "n" * 300 + ".x"),                  # a node over NAME_MAX
             ("home", "%s.home.bob/kitchen/x.temp" % ns),        # another key's series
             ("home", "%s.home..temp" % ns),
             ("home", "%s.home./.temp" % ns),
             ("home", "%s.home.bob;x=y.temp" % ns),
             ("trail", "%s.trail." % ns)]
    cases += [("dev1", dev1 + "a%sb" % char) for char in
              "\t\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0\u2028"]          # carbon splits on these
    return cases


def test_lines_carbon_would_choke_on_or_file_elsewhere_are_refused(carbon, start_proxy, keys,
                                                                    ns):
    proxy = start_proxy(carbon, "--max-line-length", "40000")
    workers = proxy.workers()
    now = int(time.time())
    good = {now - 100 + i: float(i) for i in range(30)}
    cases = bad_lines(keys, ns)
    with proxy.connect() as first, proxy.connect() as second:
        for i, (ts, value) in enumerate(good.items()):
            key, metric = cases[i % len(cases)]
            first.sendall(signed(keys, key, metric))
            second.sendall(signed(keys, key, metric))
            first.sendall(signed(keys, "dev1", "%s.dev1.ok" % ns, b"%d" % value, b"%d" % ts))
        for key, metric in cases:
            second.sendall(signed(keys, key, metric))
    wait_points(carbon, "%s.dev1.ok" % ns, good, now - 100)
    bad_sent = 2 * len(good) + len(cases)
    wait_for(lambda: counters(proxy)["rejected.badMetric"] == bad_sent, 5,
             what="every bad line counted as badMetric")
    totals = counters(proxy)
    assert totals["carbonReconnects"] == 0
    assert totals["linesForwarded"] == len(good)
    assert whisper_series(carbon, ns) == {"%s.dev1.ok" % ns}
    assert not os.path.exists(carbon.whisper_path("%s.home.bob.kitchen.x.temp" % ns))
    for metric in ("%s.dev1.x;tag=v" % ns, "%s.home.bob;x=y.temp" % ns):
        assert not os.path.exists(tagged_path(carbon, metric))
    assert proxy.workers() == workers and "worker crashed" not in proxy.log()


def test_allow_tags_forwards_tagged_series_and_applies_the_pattern_to_the_name(
        carbon, start_proxy, keys, ns):
    proxy = start_proxy(carbon, "--allow-tags")
    tagged = "%s.dev1.x;tag=v;site=b.c" % ns
    escaping = "%s.home.bob;x=y.temp" % ns  # the name is home.bob: not home.*.temp
    with proxy.connect() as sock:
        sock.sendall(signed(keys, "home", escaping) + signed(keys, "dev1", tagged, b"7") +
                     signed(keys, "dev1", "%s.dev1.y;tag=~v" % ns))
    wait_for(lambda: os.path.exists(tagged_path(carbon, tagged)), 10,
             what="the tagged series in whisper")
    proxy.wait_log(r'reason=metricNotAllowed .*metric="%s"' % escaping.replace(".", r"\."))
    proxy.wait_log(r"reason=badMetric .*tag=~v")
    assert not os.path.exists(tagged_path(carbon, escaping))


def test_poison_lines_in_the_spool_are_set_aside_and_the_rest_delivered(carbon, start_proxy,
                                                                         ns, tmp_path):
    """Lines an earlier version let through, spooled while Carbon was down."""
    now = int(time.time())
    metric = "%s.spool.m" % ns
    good = {now - 2000 + i: float(i) for i in range(1500)}
    lines = [b"%s %d %d\n" % (metric.encode(), v, ts) for ts, v in good.items()]
    poison = [b"%s.spool.\xff 1 %d\n" % (ns.encode(), now),
              b"%s.spool.%s 1 %d\n" % (ns.encode(), b"x" * 17000, now)]
    lines[700:700] = [poison[0]]
    lines[1200:1200] = [poison[1]]
    spool = tmp_path / "spool"
    os.makedirs(spool / "worker-0")
    (spool / "worker-0" / "0000000000000001.spool").write_bytes(b"".join(lines))
    proxy = start_proxy(carbon, "--spool-dir", str(spool), workers=1)
    wait_points(carbon, metric, good, now - 2000, timeout=60)
    dead = spool / DEAD_LETTER_FILE
    wait_for(lambda: dead.exists() and dead.read_bytes() == b"".join(poison), 10,
             what="both poison lines in the dead-letter file")
    wait_for(lambda: counters(proxy)["deadLetters"] == 2, 5, what="the deadLetters counter")
    totals = counters(proxy)
    print("reconnects while finding 2 poison lines among 1,502:", totals["carbonReconnects"])
    assert totals["carbonReconnects"] < 60
    assert "looking for the line it refuses" in proxy.log()


def test_absurd_numbers_do_not_crash_a_worker(carbon, start_proxy, keys, ns):
    proxy = start_proxy(carbon, "--max-line-length", "40000", workers=1)
    worker = proxy.workers()
    metric = "%s.dev1.n" % ns
    now = int(time.time())
    with proxy.connect() as bystander, proxy.connect() as attacker:
        bystander.sendall(signed(keys, "dev1", metric, b"1", b"%d" % (now - 10)))
        wait_points(carbon, metric, {now - 10: 1.0}, now - 10)
        attacker.sendall(signed(keys, "dev1", metric, b"2", b"0" * 4400 + b"%d" % now) +
                         signed(keys, "dev1", metric, b"9" * 5000) +
                         signed(keys, "dev1", metric, b"3", b"000%d" % (now - 5)))
        wait_points(carbon, metric, {now - 5: 3.0}, now - 10)  # leading zeros are fine
        bystander.sendall(signed(keys, "dev1", metric, b"4", b"%d" % (now - 3)))
        wait_points(carbon, metric, {now - 3: 4.0}, now - 10)
    totals = counters(proxy)
    assert totals["rejected.malformed"] == 1 and totals["rejected.badValue"] == 1
    assert proxy.workers() == worker and "worker crashed" not in proxy.log()


def test_a_device_that_swaps_its_keys_never_gets_its_secret_logged(carbon, start_proxy, keys,
                                                                    ns, tmp_path):
    log_file = tmp_path / "amproxy.log"
    proxy = start_proxy(carbon, "--log-file", str(log_file))
    secret = keys["dev1"][0]
    swapped = dict(keys, **{secret: ("dev1", [])})
    proxy.send(signed(swapped, secret, "%s.dev1.x" % ns))
    proxy.wait_log(r"reason=unknownKey .*public_key_length=%d" % len(secret))
    assert os.stat(log_file).st_mode & 0o777 == 0o640
    # proxy.stop() at teardown fails the test if a secret is anywhere in the log.


def test_random_bytes_in_signed_fields_land_only_as_named_in_the_keys_namespace(
        own_carbon, start_proxy, keys, ns, tmp_path):
    """Property: whatever a key signs, carbon stores exactly the series amproxy passed."""
    own_carbon.start()
    proxy = start_proxy(own_carbon, "--max-line-length", "40000")
    workers = proxy.workers()
    rng = random.Random(20261128)
    alphabet = [b"a", b"Z", b"0", b"-", b"_", b".", b"..", b"/", b";", b"=", b"*", b"{",
                b"}", b"~", b"\t", b"\x00", b"\xff", b"\xc3", b"\xc3\xa9", b"\xc2\xa0",
                b"\xe2\x80\xa8", b"\x1f", b"\\", b"'", b"%", b"\r", b" "]
    values = [b"1", b"-2.5", b"1e400", b"nan", b"inf", b"0x10", b"1_0", b"9" * 5000,
              b"+3", b".5", b"\xff", b"1\x00", b"\xd9\xa1"]
    now = int(time.time())
    stamps = [b"%d" % now, b"000%d" % now, b"0" * 4400 + b"%d" % now, b"%d" % (now + 9999),
              b"-%d" % now, b"%d.5" % now, b"\xd9\xa1", b""]
    sent = []
    for i in range(400):
        junk = b"".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 6)))
        metric = b"%s.dev1.n%d%s" % (ns.encode(), i, junk)
        value = rng.choice(values) if rng.random() < 0.3 else b"%d" % rng.randrange(1000)
        stamp = rng.choice(stamps) if rng.random() < 0.3 else stamps[0]
        line = signed(keys, "dev1", metric, value, stamp)
        sent.append(line)
    with proxy.connect() as sock:
        for start in range(0, len(sent), 50):
            sock.sendall(b"".join(sent[start:start + 50]))
    expected = {}
    auth_keys = load_auth_file(str(tmp_path / "auth.yaml")).keys
    received = 0  # a \r in the junk ends a line early, as it does for the proxy
    for piece in b"".join(sent).splitlines():
        received += bool(piece.strip())
        if check_line(piece, auth_keys, time.time(), 300) is None:
            metric, value = piece.split(b" ")[:2]
            expected[metric.decode("utf-8")] = float(value)
    assert 20 < len(expected) < 300, "the sample exercises both sides"
    wait_for(lambda: counters(proxy)["linesReceived"] == received, 10,
             what="every line counted")
    assert counters(proxy)["linesForwarded"] == len(expected)
    wait_for(lambda: whisper_series(own_carbon, ns) == set(expected), 20,
             what="carbon to store exactly the forwarded series")
    everything = [os.path.relpath(os.path.join(d, f), own_carbon.whisper_dir)
                  for d, _, files in os.walk(own_carbon.whisper_dir) for f in files]
    assert all(path.startswith(ns + "/dev1/") for path in everything), [
        p for p in everything if not p.startswith(ns + "/dev1/")][:5]
    for metric, value in list(expected.items())[:20]:
        assert value in own_carbon.points(metric, now - 400).values()
    assert counters(proxy)["carbonReconnects"] == 0
    assert proxy.workers() == workers and "worker crashed" not in proxy.log()
    for pid in workers:
        assert pid_alive(pid) and rss_bytes(pid) < 200 << 20
