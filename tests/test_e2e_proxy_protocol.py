"""--proxy-protocol: the client's address from the header, and what lacks one is closed."""
import socket
import time

import pytest

from conftest import KEYS, line_for, wait_for, wait_points
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
        assert closed_by_server(socks[2], 5)  # a third from 203.0.113.7
        for sock in socks[:2] + socks[3:]:
            assert not closed_by_server(sock, 0.5)
        assert counters(proxy)["connectionsRefused"] == 1
    finally:
        for sock in socks:
            sock.close()
