"""HAProxy's PROXY protocol, versions 1 and 2: the client's address behind a load balancer.

A load balancer in front of amproxy (HAProxy ``send-proxy`` or
``send-proxy-v2``, an AWS NLB, ...) starts each connection with a header that
names the client.  amproxy logs, records rejections and limits sources by
that address instead of the balancer's.  The specification is HAProxy's
``doc/proxy-protocol.txt``.  Pure: no I/O.
"""

import ipaddress
import struct

V1_PREFIX = b"PROXY "
V1_MAX_BYTES = 107  # the specification's limit, CRLF included
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_HEADER = struct.Struct("!12sBBH")
# TLVs (SSL details, unique ids) may follow the addresses; more than this is not a header.
V2_MAX_BYTES = 4096
_V2_ADDRESSES = {0x1: struct.Struct("!4s4sHH"), 0x2: struct.Struct("!16s16sHH")}
# Who may send headers when --proxy-protocol-from lists no one: this host only.
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


class ProxyHeaderError(ValueError):
    pass


def parse(data):
    """Parse the header at the start of ``data``.

    Returns None while ``data`` may still be the beginning of a header, else
    ``(header_length, source)``: ``source`` is the client's ``(host, port)``,
    or None when the header carries no address (a v1 ``UNKNOWN`` or a v2
    ``LOCAL`` connection: the balancer's own health check).  Raises
    ProxyHeaderError when ``data`` cannot start a valid header.
    """
    if data[:len(V2_SIGNATURE)] == V2_SIGNATURE[:len(data)]:
        return _parse_v2(data) if len(data) >= _V2_HEADER.size else None
    if data[:len(V1_PREFIX)] == V1_PREFIX[:len(data)]:
        return _parse_v1(data)
    raise ProxyHeaderError("no PROXY protocol header")


def _parse_v1(data):
    end = data.find(b"\r\n", 0, V1_MAX_BYTES)
    if end < 0:
        if len(data) >= V1_MAX_BYTES or b"\n" in data:
            raise ProxyHeaderError("PROXY v1 header not ended by CRLF within %d bytes"
                                   % V1_MAX_BYTES)
        return None
    fields = data[:end].split(b" ")
    if fields[1:2] == [b"UNKNOWN"]:
        return end + 2, None
    if len(fields) != 6 or fields[1] not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError("bad PROXY v1 header")
    version = 4 if fields[1] == b"TCP4" else 6
    source = _address(fields[2], version)
    _address(fields[3], version)
    ports = [_port(field) for field in fields[4:6]]
    return end + 2, (source, ports[0])


def _address(text, version):
    try:
        address = ipaddress.ip_address(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ProxyHeaderError("bad address in PROXY v1 header") from None
    if address.version != version:
        raise ProxyHeaderError("address of the wrong family in PROXY v1 header")
    if address.version == 6 and address.scope_id is not None:
        # "fe80::1%anything": text of the sender's choosing, bound for the logs
        raise ProxyHeaderError("scoped address in PROXY v1 header")
    return client_address(address)


def client_address(address):
    """An address as logs and limits show it: an IPv4 client mapped into IPv6 as IPv4."""
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address)


def _port(text):
    # No sign, no leading zeros, as the specification asks.
    if not text.isdigit() or (len(text) > 1 and text[:1] == b"0") or int(text) > 65535:
        raise ProxyHeaderError("bad port in PROXY v1 header")
    return int(text)


def _parse_v2(data):
    _, version_command, family, length = _V2_HEADER.unpack_from(data)
    total = _V2_HEADER.size + length
    if version_command >> 4 != 2 or version_command & 0xF > 1:
        raise ProxyHeaderError("bad PROXY v2 version or command")
    if total > V2_MAX_BYTES:
        raise ProxyHeaderError("PROXY v2 header longer than %d bytes" % V2_MAX_BYTES)
    if len(data) < total:
        return None
    if version_command & 0xF == 0:  # LOCAL: the balancer itself, no client
        return total, None
    addresses = _V2_ADDRESSES.get(family >> 4)
    if addresses is None or family & 0xF != 1:  # only TCP over IPv4 or IPv6 carries a client
        return total, None
    if length < addresses.size:
        raise ProxyHeaderError("PROXY v2 header too short for its addresses")
    source, _, source_port, _ = addresses.unpack_from(data, _V2_HEADER.size)
    return total, (client_address(ipaddress.ip_address(source)), source_port)
