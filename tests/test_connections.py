"""A client connection's state, line splitting and timeouts (connections.Connection)."""
import pytest

from amproxy.connections import (CLOSED, HANDSHAKE, HEADER, LINES, PROXY_HEADER_TIMEOUT,
                                 Connection)
from amproxy.tls import HANDSHAKE_TIMEOUT


@pytest.mark.parametrize("tls, proxy_header, state", [
    (False, False, LINES), (False, True, HEADER), (True, False, HANDSHAKE),
    (True, True, HANDSHAKE)])  # the PROXY protocol is the plain listener's
def test_a_connection_starts_in_the_first_state_its_listener_has(tls, proxy_header, state):
    assert Connection(None, ("127.0.0.1", 5), 100.0, tls, proxy_header).state == state


def test_each_state_has_its_own_clock():
    conn = Connection(None, ("127.0.0.1", 5), 100.0, proxy_header=True)
    assert conn.late(100.0 + PROXY_HEADER_TIMEOUT, idle_timeout=1) is None
    assert conn.late(100.1 + PROXY_HEADER_TIMEOUT, idle_timeout=1) == "PROXY header"
    conn.enter(LINES, 200.0)  # idle counts from the last accepted line (none: the start)
    assert conn.late(219.9, idle_timeout=120) is None
    assert conn.late(220.1, idle_timeout=120) == "idle"
    tls = Connection(None, ("127.0.0.1", 5), 100.0, tls=True)
    assert tls.late(100.1 + HANDSHAKE_TIMEOUT, idle_timeout=1) == "TLS handshake"
    tls.resume(500.0)  # after a pause, no time ran out
    assert tls.late(500.0 + HANDSHAKE_TIMEOUT, idle_timeout=1) is None
    assert CLOSED not in (conn.state, tls.state)


def test_lines_are_split_with_what_came_before_and_overlong_ones_counted():
    conn = Connection(None, ("127.0.0.1", 5), 0.0)
    assert conn.split(b"a 1 2 k s\nb 1", 100) == ([b"a 1 2 k s"], 0)
    assert conn.split(b" 2 k s\r\nc", 100) == ([b"b 1 2 k s"], 0)
    assert conn.last_lines() == [b"c"] and conn.partial == b""
    # A long line between good ones: left out and counted; the unfinished one past the
    # limit too, and dropped.
    lines, too_long = conn.split(b"ok\n" + b"x" * 20 + b"\nok2\n" + b"y" * 11, 10)
    assert (lines, too_long, conn.partial) == ([b"ok", b"ok2"], 2, b"")
    lines, too_long = conn.split(b"ok\n" + b"z" * 5, 10)  # unfinished, within the limit
    assert (lines, too_long, conn.partial) == ([b"ok"], 0, b"zzzzz")
