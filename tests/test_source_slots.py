"""Who may send PROXY headers, and how connections are counted per source (issue 21, finding 4)."""
import ipaddress
import logging

import pytest

from amproxy.connections import Connection, ProxyHeaders, SourceSlots


def networks(*texts):
    return tuple(ipaddress.ip_network(text) for text in texts)


@pytest.mark.parametrize("peer", ["127.0.0.1", "127.3.4.5", "::1", "::ffff:127.0.0.1"])
def test_without_proxy_protocol_from_loopback_may_send_headers(peer):
    assert ProxyHeaders.trusts(peer, ())


@pytest.mark.parametrize("peer", ["10.0.0.5", "192.168.1.20", "203.0.113.7", "2001:db8::1",
                                  "::ffff:10.0.0.5", "fe80::1%eth0", "unix", ""])
def test_without_proxy_protocol_from_no_other_host_may(peer):
    # Before: anyone, who could then claim any address (rotating them past the
    # per-source limit, or filling one address's slots with forged headers).
    assert not ProxyHeaders.trusts(peer, ())


def test_a_list_replaces_the_default():
    balancers = networks("10.0.0.0/8", "192.0.2.1/32")
    assert ProxyHeaders.trusts("10.1.2.3", balancers)
    assert ProxyHeaders.trusts("::ffff:192.0.2.1", balancers)
    assert not ProxyHeaders.trusts("127.0.0.1", balancers)
    assert not ProxyHeaders.trusts("192.0.2.2", balancers)
    anyone = networks("0.0.0.0/0", "::/0")
    assert ProxyHeaders.trusts("203.0.113.7", anyone)
    assert ProxyHeaders.trusts("2001:db8::1", anyone)


def test_a_refused_balancer_is_told_what_to_set(caplog):
    caplog.set_level(logging.WARNING)
    headers = ProxyHeaders(lambda: 0.0, ())
    assert not headers.refuses(Connection(None, ("127.0.0.1", 1000), 0.0))
    assert headers.refuses(Connection(None, ("10.0.0.5", 1000), 0.0))
    assert headers.count == 1
    assert ("10.0.0.5 is not a --proxy-protocol-from address (default: loopback only)"
            in caplog.text)
    listed = ProxyHeaders(lambda: 0.0, networks("10.0.0.0/8"))
    assert listed.refuses(Connection(None, ("192.0.2.7", 1000), 0.0))
    assert "192.0.2.7 is not a --proxy-protocol-from address" in caplog.text


@pytest.mark.parametrize("source, group", [
    ("203.0.113.7", "203.0.113.7"),  # IPv4: per address
    ("::ffff:203.0.113.7", "203.0.113.7"),  # an IPv4 client on a dual-stack socket
    ("2001:db8::1", "2001:db8::/64"),
    ("2001:db8::ffff:ffff:ffff:ffff", "2001:db8::/64"),
    ("2001:db8:0:1::1", "2001:db8:0:1::/64"),
    ("fe80::1%eth0", "fe80::/64"),
    ("unix", "unix"),
])
def test_ipv6_sources_are_grouped_by_their_64(source, group):
    assert SourceSlots().key(source) == group
    assert SourceSlots(64).key(source) == group


def test_the_prefix_can_be_changed():
    assert SourceSlots(128).key("2001:db8::1") == "2001:db8::1/128"
    assert SourceSlots(128).key("2001:db8::2") != SourceSlots(128).key("2001:db8::1")
    assert SourceSlots(48).key("2001:db8:0:ffff::1") == "2001:db8::/48"
    assert SourceSlots(1).key("7fff::1") == "::/1"
    assert SourceSlots(48).key("203.0.113.7") == "203.0.113.7"


def test_one_host_cannot_spread_over_its_64_past_the_cap():
    slots = SourceSlots()
    for i in range(1, 3):
        assert slots.admits(slots.key("2001:db8::%x" % i), 2)
        slots.add(slots.key("2001:db8::%x" % i))
    assert not slots.admits(slots.key("2001:db8::ffff:1234"), 2)
    assert slots.admits(slots.key("2001:db8:0:1::1"), 2)  # the next /64 is another host
    assert slots.admits(slots.key("203.0.113.7"), 2)
    slots.remove(slots.key("2001:db8::1"))
    assert slots.admits(slots.key("2001:db8::ffff:1234"), 2)


def test_a_slot_moves_from_the_peer_to_the_claimed_source():
    # A connection waiting for its PROXY header holds a slot of the balancer; once
    # the header names the client, the slot is the client's, if it has room.
    slots = SourceSlots()
    peer = slots.key("127.0.0.1")
    slots.add(peer)
    slots.add(peer)
    assert not slots.admits(peer, 2)
    claimed = slots.move(peer, "2001:db8::7", 1)
    assert claimed == "2001:db8::/64"
    assert slots.admits(peer, 2) and not slots.admits(claimed, 1)
    # The client's group is full: the slot is given up, and the connection gets none.
    assert slots.move(peer, "2001:db8::8", 1) is None
    assert slots.admits(peer, 1) and not slots.admits(claimed, 1)


def test_waiting_connections_of_one_peer_leave_room_for_others():
    # 20 connections from one host that never send their header: with 10 slots and a
    # per-source limit of 2, the host holds 9 (the default share), not all 10.
    slots = SourceSlots()
    slots.limit(10, 2, 64)
    held = []
    for _ in range(20):
        key = slots.room("127.0.0.1", waiting=True)
        if key is not None:
            slots.add(key)
            held.append(key)
    assert len(held) == 9
    assert slots.room("127.0.0.2", waiting=True) == "127.0.0.2"
    # The per-device limit applies to a client's own connections, as before.
    assert slots.room("203.0.113.7") is not None
    slots.add("203.0.113.7")
    slots.add("203.0.113.7")
    assert slots.room("203.0.113.7") is None
    assert slots.move(held.pop(), "203.0.113.7") is None
    assert slots.move(held.pop(), "198.51.100.9") == "198.51.100.9"
    # A per-source limit above the share is the operator's: it applies to both.
    slots.limit(10, 10, 64)
    assert slots.per_source == slots.per_waiting_peer == 10
    slots.limit(10, 0, 64)
    assert slots.per_source == slots.per_waiting_peer == 9
    slots.limit(10, 0, 128)
    assert slots.key("2001:db8::1") == "2001:db8::1/128"
