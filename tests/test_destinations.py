"""A worker's destinations: one down holds only its own lines; spools per destination."""
import os
import selectors
import socket
import time
import types

from amproxy.destinations import Destinations, stranded_spools
from amproxy.placement import Placement, parse_destinations


def options(addresses, spool_dir="", buffer_size=100, **extra):
    values = dict(carbon_addr=parse_destinations(addresses), relay_method="consistent-hashing",
                  hash_type="carbon_ch", replication_factor=1, diverse_replicas=True,
                  spool_dir=spool_dir, spool_max_bytes=1 << 20, buffer_size=buffer_size,
                  replay_rate=0, resend_window=0.0)
    values.update(extra)
    return types.SimpleNamespace(**values)


def listener():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(4)
    return sock


def closed_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def received(conn, expected_lines, destinations, selector, timeout=5.0):
    """Run the worker's side while reading what Carbon ``conn`` gets, until it has enough."""
    conn.setblocking(False)
    data = b""
    deadline = time.monotonic() + timeout
    while data.count(b"\n") < expected_lines:
        assert time.monotonic() < deadline, data
        destinations.flush()
        for key, mask in selector.select(0.02):
            key.data(mask)
        try:
            data += conn.recv(65536)
        except BlockingIOError:
            pass
    return data.splitlines()


def test_a_destination_that_is_down_holds_only_its_lines_and_spools_them(tmp_path):
    up = listener()
    down_port = closed_port()
    addresses = "127.0.0.1:%d:a,127.0.0.1:%d:b" % (up.getsockname()[1], down_port)
    opts = options(addresses, spool_dir=str(tmp_path / "spool"), buffer_size=50)
    selector = selectors.DefaultSelector()
    destinations = Destinations(opts, selector, time.monotonic, slot=3)
    placement = Placement(opts.carbon_addr)
    lines = [b"dev.m%d 1 1700000000" % i for i in range(400)]
    to_up = [line for line in lines if placement.place(line.split()[0]) == (0,)]
    assert 100 < len(to_up) < 300
    destinations.send(lines)
    destinations.flush()
    conn, _ = up.accept()
    assert received(conn, len(to_up), destinations, selector) == to_up
    # The other's lines wait for it, on disk once its memory is full; no pause.
    assert not destinations.full
    down_spool = tmp_path / "spool" / ("127.0.0.1:%d:b" % down_port) / "worker-3"
    assert any(name.endswith(".spool") for name in os.listdir(down_spool))
    up_spool = tmp_path / "spool" / ("127.0.0.1:%d:a" % up.getsockname()[1]) / "worker-3"
    assert not any(name.endswith(".spool") for name in os.listdir(up_spool))
    gauges = destinations.gauges()
    b_node = "destinations.127_0_0_1_%d_b" % down_port
    assert gauges[b_node + ".spooledBytes"] > 0
    assert destinations.counters()["destinations.127_0_0_1_%d_a.linesSent"
                                   % up.getsockname()[1]] == len(to_up)
    destinations.close()
    conn.close()
    up.close()


def test_broadcast_and_replication_send_each_line_to_each_of_its_destinations():
    first, second = listener(), listener()
    addresses = "127.0.0.1:%d:a,127.0.0.1:%d:b" % (first.getsockname()[1],
                                                   second.getsockname()[1])
    lines = [b"dev.m%d 1 1700000000" % i for i in range(50)]
    for extra in ({"relay_method": "broadcast"},
                  {"replication_factor": 2, "diverse_replicas": False}):
        selector = selectors.DefaultSelector()
        destinations = Destinations(options(addresses, **extra), selector, time.monotonic, 0)
        destinations.send(lines)
        destinations.flush()
        conns = [first.accept()[0], second.accept()[0]]
        for conn in conns:
            assert received(conn, len(lines), destinations, selector) == lines
            conn.close()
        destinations.close()
    first.close()
    second.close()


def test_spools_of_destinations_no_longer_listed_are_named(tmp_path):
    spool = tmp_path / "spool"
    (spool / "worker-0").mkdir(parents=True)  # from a single destination
    (spool / "worker-0" / "0000000000000001.spool").write_bytes(b"a.b 1 1\n")
    (spool / "old:2003:z" / "worker-1").mkdir(parents=True)
    (spool / "old:2003:z" / "worker-1" / "0000000000000001.spool").write_bytes(b"a.b 1 1\n")
    (spool / "empty:2003:y" / "worker-0").mkdir(parents=True)  # nothing in it
    several = parse_destinations("h1:2003:a,h2:2003:b")
    assert sorted(stranded_spools(str(spool), several)) == [
        str(spool / "old:2003:z" / "worker-1"), str(spool / "worker-0")]
    # Back to the one destination: only the subdirectory's lines are stranded.
    assert stranded_spools(str(spool), parse_destinations("h1:2003")) == [
        str(spool / "old:2003:z" / "worker-1")]


def test_lines_spooled_for_another_list_of_destinations_are_placed_again(tmp_path):
    # One destination, then two: what the single one's spool held is re-placed.
    first, second = listener(), listener()
    addresses = "127.0.0.1:%d:a,127.0.0.1:%d:b" % (first.getsockname()[1],
                                                   second.getsockname()[1])
    spool = tmp_path / "spool"
    (spool / "worker-0").mkdir(parents=True)
    lines = [b"dev.m%d %d 1700000000" % (i, i) for i in range(300)]
    (spool / "worker-0" / "0000000000000001.spool").write_bytes(b"\n".join(lines[:200]) + b"\n")
    (spool / "worker-1").mkdir()  # another worker's, left by a smaller config
    (spool / "worker-1" / "0000000000000001.spool").write_bytes(b"\n".join(lines[200:]) + b"\n")
    opts = options(addresses, spool_dir=str(spool))
    placement = Placement(opts.carbon_addr)
    selector = selectors.DefaultSelector()
    destinations = Destinations(opts, selector, time.monotonic, slot=0)
    destinations.replay_stranded(str(spool), 1 << 20)
    assert stranded_spools(str(spool), opts.carbon_addr) == []
    destinations.flush()
    for index, sock in enumerate((first, second)):
        conn, _ = sock.accept()
        expected = [line for line in lines if placement.place(line.split()[0]) == (index,)]
        assert sorted(received(conn, len(expected), destinations, selector)) == sorted(expected)
        conn.close()
    destinations.close()
    first.close()
    second.close()


def test_the_placement_memory_is_bounded_in_names_and_bytes(monkeypatch):
    from amproxy import destinations as module
    monkeypatch.setattr(module, "CarbonSender", lambda *args: types.SimpleNamespace(
        enqueue=lambda data, lines: None))
    destinations = Destinations(options("a:1:a,b:1:b"), None, time.monotonic, 0)
    long_names = [b"dev." + b"x" * 4000 + b".%d" % i for i in range(3000)]
    for name in long_names:
        destinations.send([name + b" 1 1700000000"])
    assert destinations._placed_bytes <= module.CACHE_BYTES
    assert sum(map(len, destinations._placed)) <= module.CACHE_BYTES
    for i in range(module.CACHE_SIZE + 10):
        destinations.send([b"d.%d 1 1700000000" % i])
    assert len(destinations._placed) <= module.CACHE_SIZE
