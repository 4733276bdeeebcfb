"""The PROXY protocol header, versions 1 and 2 (HAProxy's doc/proxy-protocol.txt)."""
import ipaddress
import struct

import pytest

from amproxy.proxyprotocol import V2_SIGNATURE, ProxyHeaderError, parse


def v2(source="203.0.113.7", port=51234, command=1, family=None, protocol=1, tlvs=b""):
    address = ipaddress.ip_address(source)
    if address.version == 4:
        body = struct.pack("!4s4sHH", address.packed, b"\x0a\x00\x00\x01", port, 2005)
        family = 1 if family is None else family
    else:
        body = struct.pack("!16s16sHH", address.packed, b"\x00" * 15 + b"\x01", port, 2005)
        family = 2 if family is None else family
    body += tlvs
    return V2_SIGNATURE + struct.pack("!BBH", 0x20 | command, family << 4 | protocol,
                                      len(body)) + body


@pytest.mark.parametrize("header, source", [
    (b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 2005\r\n", ("203.0.113.7", 51234)),
    (b"PROXY TCP6 2001:db8::7 2001:db8::1 51234 2005\r\n", ("2001:db8::7", 51234)),
    (b"PROXY UNKNOWN\r\n", None),
    (b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n", None),
    (v2(), ("203.0.113.7", 51234)),
    (v2("2001:db8::7", 443), ("2001:db8::7", 443)),
    (v2(tlvs=b"\x05\x00\x04abcd"), ("203.0.113.7", 51234)),  # a unique-id TLV
    (v2(command=0), None),  # LOCAL: the balancer's health check
    (v2(family=0), None),  # UNSPEC
    # An IPv4 client that reached the balancer over IPv6 is the IPv4 address.
    (b"PROXY TCP6 ::ffff:203.0.113.7 ::1 51234 2005\r\n", ("203.0.113.7", 51234)),
    (v2("::ffff:203.0.113.7", 7), ("203.0.113.7", 7)),
])
def test_headers_give_the_clients_address_and_their_length(header, source):
    rest = b"dev1.temp 21 1700000000 k sig\n"
    assert parse(header + rest) == (len(header), source)
    # Cut anywhere, a header is incomplete, never wrong.
    for cut in range(len(header)):
        assert parse(header[:cut]) is None, cut


@pytest.mark.parametrize("data", [
    b"dev1.temp 21 1700000000 k sig\n",  # a plain client on the balancer's port
    b"\x16\x03\x01\x02\x00",  # TLS
    b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 2005\n",  # LF only
    b"PROXY TCP4 203.0.113.7 10.0.0.1 51234\r\n",
    b"PROXY TCP5 203.0.113.7 10.0.0.1 51234 2005\r\n",
    b"PROXY TCP4 2001:db8::7 10.0.0.1 51234 2005\r\n",  # family mismatch
    b"PROXY TCP4 203.0.113.999 10.0.0.1 51234 2005\r\n",
    b"PROXY TCP4 203.0.113.7 10.0.0.1 65536 2005\r\n",
    b"PROXY TCP4 203.0.113.7 10.0.0.1 0123 2005\r\n",
    b"PROXY TCP4 203.0.113.7 10.0.0.1 +1 2005\r\n",
    b"PROXY TCP4 203.0.113.7  10.0.0.1 1 2005\r\n",
    b'PROXY TCP6 fe80::1%x"_level=err_msg=forged ::2 1 2\r\n',  # a scope id is free text
    b"PROXY " + b"9" * 200,  # no CRLF within 107 bytes
    V2_SIGNATURE + b"\x11\x11\x00\x0c" + b"\x00" * 12,  # version 1
    V2_SIGNATURE + b"\x22\x11\x00\x0c" + b"\x00" * 12,  # command 2
    V2_SIGNATURE + b"\x21\x11\x00\x04" + b"\x00" * 4,  # too short for IPv4 addresses
    V2_SIGNATURE + b"\x21\x11\xff\xff",  # 64 KB of header
])
def test_anything_else_is_refused(data):
    with pytest.raises(ProxyHeaderError):
        parse(data)
