"""--proxy-protocol: the client's address from the header, and what lacks one is closed."""
import os
import signal
import socket
import subprocess
import time

import pytest

from conftest import AMPROXY, KEYS, line_for, wait_for, wait_points
from test_e2e_hostile import counters
from test_proxyprotocol import v2


@pytest.fixture
def pp_proxy(carbon, auth_file, make_proxy, tmp_path):
    def make(*args, workers=2):
        stats_socket = str(tmp_path / ("stats-%d.sock" % time.monotonic_ns()))
        proxy = make_proxy(carbon.address, auth_file, workers=workers, args=[
            "--proxy-protocol", "--stats-socket", stats_socket] + list(args))
        proxy.stats_socket = stats_socket
        return proxy
    return make


def closed_by_server(sock, timeout):
    """True once the server has closed ``sock`` (EOF or reset), False if it stays open."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


@pytest.mark.parametrize("header, remote", [
    (b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 2005\r\n", "203.0.113.7:51234"),
    (v2("203.0.113.7", 51234), "203.0.113.7:51234"),
    (v2("2001:db8::7", 51234), "[2001:db8::7]:51234")], ids=["v1", "v2", "v2-ipv6"])
def test_lines_after_a_header_pass_and_rejections_name_the_client(carbon, pp_proxy, header,
                                                                  remote):
    proxy = pp_proxy()
    now = int(time.time())
    value = float(len(header))  # each case its own value: they share a Carbon
    good = line_for(KEYS, "alpha", "e2e.alpha.humidity", value, now - 3)
    bad = line_for(KEYS, "alpha", "e2e.alpha.humidity", value + 1, now - 3).replace(
        b" %.1f " % (value + 1), b" %.1f " % (value + 2))  # the signature no longer matches
    assert bad.split()[1] == b"%.1f" % (value + 2)
    with proxy.connect() as sock:
        # The header and the first line in separate packets, then together.
        sock.sendall(header[:9])
        time.sleep(0.05)  # pacing: the header arrives in two reads
        sock.sendall(header[9:] + bad + good)
    wait_points(carbon, "e2e.alpha.humidity", {now - 3: value}, now - 10)
    wait_for(lambda: "reason=badSignature remote=%s " % remote in proxy.log(), 5,
             what="the rejection logged with the client's address")


@pytest.mark.parametrize("what, data", [
    ("a plain line", None),
    ("TLS", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"),
    ("a broken header", b"PROXY TCP4 203.0.113.999 10.0.0.1 1 2\r\n"),
])
def test_a_connection_without_a_valid_header_is_closed_and_counted(pp_proxy, what, data):
    proxy = pp_proxy()
    with proxy.connect() as sock:
        sock.sendall(data or line_for(KEYS, "alpha", "e2e.alpha.humidity", 1))
        assert closed_by_server(sock, 5), what
    assert wait_for(lambda: counters(proxy)["proxyHeaderErrors"] == 1, 5,
                    what="the error counted")
    assert "PROXY" in proxy.log()
    assert proxy.process.poll() is None


def test_a_client_that_sends_no_header_is_closed_after_a_few_seconds(pp_proxy):
    proxy = pp_proxy()
    with proxy.connect() as silent, proxy.connect() as half:
        half.sendall(b"PROXY TCP4 203.0.113.7")
        assert not closed_by_server(silent, 2)  # a slow balancer has some time
        assert closed_by_server(silent, 10) and closed_by_server(half, 5)
    assert wait_for(lambda: counters(proxy)["proxyHeaderErrors"] == 2, 5,
                    what="both counted")
    assert "no PROXY header within 5 s" in proxy.log()


def test_a_health_check_that_sends_nothing_is_not_an_error(pp_proxy):
    proxy = pp_proxy()
    for _ in range(3):
        proxy.connect().close()
    wait_for(lambda: counters(proxy)["connectionsOpened"] >= 3, 5, what="three connections")
    assert counters(proxy)["proxyHeaderErrors"] == 0


def test_the_per_source_limit_counts_the_clients_address_not_the_balancers(pp_proxy):
    proxy = pp_proxy("--max-connections-per-source", "2", workers=1)  # the limit is per worker
    first = v2("203.0.113.7", 1000)
    other = v2("198.51.100.9", 1000)
    socks = [proxy.connect() for _ in range(4)]
    try:
        for sock, header in zip(socks, [first, first, first, other]):
            sock.sendall(header)
        # One of the three from 203.0.113.7 is closed: the one whose header the worker
        # reads third (a client's header read as it is accepted may come before one
        # that arrived earlier on a connection accepted earlier).
        closed = [closed_by_server(sock, 2) for sock in socks[:3]]
        assert sorted(closed) == [False, False, True], closed
        assert not closed_by_server(socks[3], 0.5)
        assert counters(proxy)["connectionsRefused"] == 1
    finally:
        for sock in socks:
            sock.close()


def test_a_stop_reads_what_a_just_accepted_connection_sent_with_its_header(
        carbon, auth_file, make_proxy):
    # HAProxy sends the header and the first lines at once; a stop that comes in
    # the same loop pass as the accept must still read them.
    now = int(time.time())
    for trial in range(3):
        proxy = make_proxy(carbon.address, auth_file, workers=1, args=["--proxy-protocol"])
        proxy.wait_log("workers ready")  # booted: its loop is running
        worker = proxy.workers()[0]
        os.kill(worker, signal.SIGSTOP)
        try:
            sock = proxy.connect()
            value = 100.0 + trial
            sock.sendall(v2("203.0.113.7", 1000)
                         + line_for(KEYS, "alpha", "e2e.alpha.humidity", value, now - 20 - trial))
            wait_for(lambda: connection_queued(proxy), 5, what="the connection queued")
            proxy.signal(signal.SIGTERM)
        finally:
            os.kill(worker, signal.SIGCONT)
        assert proxy.wait_exit(30) == 0
        sock.close()
        wait_points(carbon, "e2e.alpha.humidity", {now - 20 - trial: value}, now - 30)


def connection_queued(proxy):
    """The client's connection is waiting in the listen queue (the worker is stopped)."""
    with open("/proc/net/tcp") as f:
        rows = [row.split() for row in list(f)[1:]]
    return any(int(r[1].split(":")[1], 16) == proxy.port and r[3] == "0A" and
               int(r[4].split(":")[1], 16) > 0 for r in rows)


def test_a_client_waiting_for_its_header_to_be_read_survives_a_pause(
        own_carbon, auth_file, make_proxy):
    # While Carbon cannot take more, clients are not read: the 5 s for the header
    # must not run out meanwhile, or the lines behind it are lost.
    proxy = make_proxy(own_carbon.address, auth_file, workers=1, args=[
        "--proxy-protocol", "--buffer-size", "10"])  # Carbon is not running yet
    now = int(time.time())
    header = v2("198.51.100.9", 2000)
    late = proxy.connect()
    late.sendall(header[:10])
    with proxy.connect() as filler:
        filler.sendall(v2("203.0.113.7", 1000) + b"".join(
            line_for(KEYS, "alpha", "e2e.alpha.temp", float(i), now - 100 + i)
            for i in range(30)))
        wait_for(lambda: "pausing reads from clients" in proxy.log(), 10, what="the pause")
        late.sendall(header[10:] + line_for(KEYS, "alpha", "e2e.alpha.humidity", 55.5, now - 50))
        deadline = time.monotonic() + 7
        while time.monotonic() < deadline:  # longer than the header's 5 s, all paused
            assert "no PROXY header" not in proxy.log()
            time.sleep(0.5)
        own_carbon.start()
        wait_points(own_carbon, "e2e.alpha.humidity", {now - 50: 55.5}, now - 60)
        wait_points(own_carbon, "e2e.alpha.temp",
                    {now - 100 + i: float(i) for i in range(30)}, now - 110)
    late.close()


def test_only_the_balancers_in_proxy_protocol_from_may_send_headers(carbon, pp_proxy):
    now = int(time.time())
    stranger = pp_proxy("--proxy-protocol-from", "10.0.0.0/8, 192.0.2.1")
    with stranger.connect() as sock:
        sock.sendall(v2("203.0.113.7", 1000)
                     + line_for(KEYS, "alpha", "e2e.alpha.humidity", 61.0, now - 7))
        assert closed_by_server(sock, 5)
    # Two: this one, and the check at start-up that the port is open.
    assert wait_for(lambda: counters(stranger)["proxyHeaderErrors"] == 2, 5, what="counted")
    assert "127.0.0.1 is not a --proxy-protocol-from address" in stranger.log()
    balancer = pp_proxy("--proxy-protocol-from", "127.0.0.0/8")
    with balancer.connect() as sock:
        sock.sendall(v2("203.0.113.7", 1000)
                     + line_for(KEYS, "alpha", "e2e.alpha.humidity", 62.0, now - 7))
    wait_points(carbon, "e2e.alpha.humidity", {now - 7: 62.0}, now - 10)


def test_a_bad_balancer_network_is_named(auth_file):
    result = subprocess.run([AMPROXY, "server", "--auth-file", str(auth_file),
                             "--proxy-protocol-from", "10.0.0.0/8,10.0.0.300"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "'10.0.0.300' is not an address or network" in result.stderr


def test_by_default_only_loopback_may_send_headers_and_the_start_says_so(carbon, pp_proxy):
    # Without --proxy-protocol-from, anyone who reached the port could claim any
    # address; now only this host may (tests/test_source_slots.py tries others).
    proxy = pp_proxy()
    assert "proxy_protocol_from=127.0.0.0/8,::1/128\n" in proxy.log()
    now = int(time.time())
    with proxy.connect() as sock:
        sock.sendall(v2("203.0.113.7", 1000)
                     + line_for(KEYS, "alpha", "e2e.alpha.humidity", 63.0, now - 8))
    wait_points(carbon, "e2e.alpha.humidity", {now - 8: 63.0}, now - 10)
    listed = pp_proxy("--proxy-protocol-from", "10.0.0.0/8,127.0.0.1")
    assert "proxy_protocol_from=10.0.0.0/8,127.0.0.1/32\n" in listed.log()


def connect_from(host, address):
    """A connection to ``address`` from the local address ``host`` (another loopback
    address is another source)."""
    sock = socket.socket()
    sock.settimeout(5)
    try:
        sock.bind((host, 0))
        sock.connect(address)
    except OSError as e:
        sock.close()
        pytest.skip("cannot connect from %s: %s" % (host, e))
    return sock


def test_silent_connections_from_one_peer_cannot_hold_every_slot(carbon, pp_proxy):
    # 20 connections that never send their header, from one peer: before, they
    # counted against no source and held all 10 slots (renewable every 5 s), so a
    # client from anywhere else waited in the listen queue for 10 s.
    proxy = pp_proxy("--max-connections", "10", "--max-connections-per-source", "2",
                     workers=1)
    silent = [proxy.connect() for _ in range(20)]
    try:
        now = int(time.time())
        with connect_from("127.0.0.2", proxy.address) as other:
            other.sendall(v2("198.51.100.9", 1000)
                          + line_for(KEYS, "alpha", "e2e.alpha.humidity", 64.0, now - 9))
            # Well within the 5 s after which the silent ones would be closed anyway.
            wait_points(carbon, "e2e.alpha.humidity", {now - 9: 64.0}, now - 10, timeout=3)
        # 127.0.0.1 held 9 of the 10 (the default share: a balancer's connections
        # wait a moment each, and a small per-device limit must not cap it); the
        # other 11 were closed at once.
        assert wait_for(lambda: counters(proxy)["connectionsRefused"] == 11, 5,
                        what="the 11 counted")
        assert sum(closed_by_server(sock, 0.01) for sock in silent) == 11
        assert "too many connections from its address" in proxy.log()
    finally:
        for sock in silent:
            sock.close()


@pytest.mark.parametrize("prefix, refused", [(None, 1), ("128", 0), ("112", 0), ("48", 2)])
def test_the_per_source_limit_groups_ipv6_clients_by_their_64(pp_proxy, prefix, refused):
    # Before, one host could open as many connections as its /64 has addresses.
    args = ["--max-connections-per-source", "2"]
    if prefix:
        args += ["--source-ipv6-prefix", prefix]
    proxy = pp_proxy(*args, workers=1)
    headers = [v2("2001:db8::1", 1000), v2("2001:db8::2:0:0:2", 1000),
               v2("2001:db8::ffff:3", 1000), v2("2001:db8:0:1::1", 1000)]
    socks = [proxy.connect() for _ in headers]
    try:
        for sock, header in zip(socks, headers):
            sock.sendall(header)
        closed = [closed_by_server(sock, 1) for sock in socks]
        assert sum(closed) == refused, closed
        if prefix is None:
            assert not closed[3], closed  # another /64: another host
        assert counters(proxy)["connectionsRefused"] == refused
    finally:
        for sock in socks:
            sock.close()
