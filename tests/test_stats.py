"""A worker's stats reports reach the master whole, however many keys they carry."""
import errno
import json
import logging
import os

import pytest

from amproxy.links import StatsChannels
from amproxy.stats import (COUNTERS, GAUGES, MAX_DATAGRAM, StatsCollector,
                           WorkerStats)

GAUGE_VALUES = {"activeConnections": 3, "bufferedLines": 7, "spooledBytes": 11}


class GatedSocket:
    """Passes sends to the real socket, or raises ``failure`` once ``open_sends`` run out."""

    def __init__(self, sock, failure):
        self.sock = sock
        self.failure = failure
        self.open_sends = None  # None: every send goes through
        self.sizes = []

    def send(self, data):
        if self.open_sends is not None:
            if self.open_sends == 0:
                raise self.failure
            self.open_sends -= 1
        self.sizes.append(len(data))
        return self.sock.send(data)


@pytest.fixture
def pipeline():
    channels = StatsChannels()
    worker = WorkerStats(channels, per_key=True)
    collector = StatsCollector(channels, "p", per_key=True)
    yield channels, worker, collector
    for sock in (channels.reports_in, channels.reports_out, channels.outbox_in,
                 channels.outbox_out):
        sock.close()


def key_names(count):
    """Bytes keys: short ASCII, long (several hundred bytes) and non-ASCII UTF-8."""
    names = []
    for i in range(count):
        if i % 3 == 0:
            names.append(("key-%d" % i).encode())
        elif i % 3 == 1:
            names.append(("ключ-鍵-%d-" % i).encode() + "ü".encode() * (i % 50))
        else:
            names.append(("long-%d-" % i).encode() + b"x" * (300 + i % 200))
    return names


def count_traffic(worker, expected, names, forwarded, rejected):
    """Count lines per key as the worker does, and in ``expected`` as the master should."""
    for i, key in enumerate(names):
        f, r = forwarded(i), rejected(i)
        if f:
            worker.forwarded_per_key[key] = worker.forwarded_per_key.get(key, 0) + f
        if r:
            worker.rejected_per_key[key] = worker.rejected_per_key.get(key, 0) + r
        counts = expected.setdefault(key.decode(), [0, 0])
        counts[0] += f
        counts[1] += r


def worker_counters(step):
    """A worker's running counters; each name distinct so a mix-up shows."""
    return {name: step * (i + 1) for i, name in enumerate(COUNTERS)}


def report_until_sent(worker, collector, counters, gauges=GAUGE_VALUES, rounds=200):
    """Report and drain, as the worker's and master's loops do, until all went out."""
    for _ in range(rounds):
        sent = worker.report(counters, gauges)
        collector.drain()
        if sent:
            return
    raise AssertionError("the report never went out whole in %d rounds" % rounds)


@pytest.mark.parametrize("key_count", [10000, 20000])
def test_many_keys_reach_the_master_exactly_and_reports_go_on(pipeline, key_count):
    channels, worker, collector = pipeline
    worker.sock = gate = GatedSocket(worker.sock, None)
    names = key_names(key_count)
    expected = {}
    count_traffic(worker, expected, names, lambda i: 1 + i % 7, lambda i: i % 3)
    report_until_sent(worker, collector, worker_counters(1))
    assert collector.totals == worker_counters(1)
    assert collector.key_totals == expected
    assert max(gate.sizes) < MAX_DATAGRAM
    assert not worker.forwarded_per_key and not worker.rejected_per_key
    # More traffic, on half of the keys: the next report is exact too.
    count_traffic(worker, expected, names[::2], lambda i: 2, lambda i: i % 2)
    report_until_sent(worker, collector, worker_counters(5))
    assert collector.totals == worker_counters(5)
    assert collector.key_totals == expected
    assert collector.current_gauges([os.getpid()]) == dict(GAUGE_VALUES, workers=1)


def test_a_report_cut_short_sends_the_rest_later_and_nothing_twice(pipeline):
    channels, worker, collector = pipeline
    worker.sock = gate = GatedSocket(worker.sock, BlockingIOError(errno.EAGAIN, "full"))
    names = key_names(10000)
    expected = {}
    count_traffic(worker, expected, names, lambda i: 1 + i % 5, lambda i: i % 4)
    gate.open_sends = 2  # the counters and one share of the keys, then it would block
    assert worker.report(worker_counters(1), GAUGE_VALUES) is False
    collector.drain()
    assert collector.totals == worker_counters(1)
    assert 0 < len(collector.key_totals) < len(expected)
    # Traffic meanwhile, on keys already sent and on keys still waiting.
    count_traffic(worker, expected, names, lambda i: 1, lambda i: 0)
    gate.open_sends = None
    report_until_sent(worker, collector, worker_counters(2))
    assert collector.totals == worker_counters(2)
    assert collector.key_totals == expected


def test_a_report_that_would_block_keeps_its_deltas(pipeline):
    channels, worker, collector = pipeline
    worker.forwarded_per_key[b"alpha"] = 4
    worker.rejected_per_key[b"alpha"] = 1
    try:  # fill the channel as a master that is busy elsewhere would leave it
        while True:
            channels.reports_out.send(b"x" * 50000)
    except BlockingIOError:
        pass
    assert worker.report(worker_counters(1), GAUGE_VALUES) is False
    collector.drain()  # the filler is not JSON, and is skipped
    assert collector.totals == dict.fromkeys(COUNTERS, 0)
    worker.forwarded_per_key[b"alpha"] += 1
    assert worker.report(worker_counters(2), GAUGE_VALUES) is True
    collector.drain()
    assert collector.totals == worker_counters(2)
    assert collector.key_totals == {"alpha": [5, 1]}


def test_a_failing_send_is_logged_once_and_later_reports_still_go_out(pipeline, caplog):
    channels, worker, collector = pipeline
    worker.sock = gate = GatedSocket(worker.sock, OSError(errno.EMSGSIZE, "Message too long"))
    gate.open_sends = 0
    worker.forwarded_per_key[b"alpha"] = 2
    with caplog.at_level(logging.DEBUG, logger="amproxy.stats"):
        for step in range(1, 6):
            assert worker.report(worker_counters(step), GAUGE_VALUES) is False
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, caplog.text
    assert "Message too long" in warnings[0].getMessage()
    gate.open_sends = None
    worker.forwarded_per_key[b"alpha"] += 1
    assert worker.report(worker_counters(6), GAUGE_VALUES) is True
    collector.drain()
    assert collector.totals == worker_counters(6)
    assert collector.key_totals == {"alpha": [3, 0]}


def test_a_closed_master_end_is_logged_once(pipeline, caplog):
    channels, worker, collector = pipeline
    channels.reports_in.close()
    with caplog.at_level(logging.DEBUG, logger="amproxy.stats"):
        for step in range(1, 4):
            assert worker.report(worker_counters(step), GAUGE_VALUES) is False
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1, caplog.text


def test_a_keys_only_datagram_leaves_the_gauges_alone(pipeline):
    channels, worker, collector = pipeline
    pid = os.getpid()
    channels.reports_out.send(json.dumps(
        {"pid": pid, "counters": {"linesForwarded": 2}, "gauges": GAUGE_VALUES}).encode())
    channels.reports_out.send(json.dumps({"pid": pid, "keys": {"alpha": [2, 0]}}).encode())
    collector.drain()
    assert collector.current_gauges([pid]) == dict(GAUGE_VALUES, workers=1)
    assert collector.totals["linesForwarded"] == 2
    assert collector.key_totals == {"alpha": [2, 0]}


def test_the_new_counters_are_reported_and_may_be_missing():
    assert COUNTERS[COUNTERS.index("droppedLines") + 1:][:2] == ("deadLetters",
                                                                 "internalErrors")
    assert set(GAUGE_VALUES) == set(GAUGES)
    channels = StatsChannels()
    worker = WorkerStats(channels, per_key=False)
    collector = StatsCollector(channels, "p", per_key=False)
    before_the_worker_counts_them = {name: 1 for name in COUNTERS
                                     if name not in ("deadLetters", "internalErrors")}
    assert worker.report(before_the_worker_counts_them, GAUGE_VALUES) is True
    assert worker.report(dict.fromkeys(COUNTERS, 3), GAUGE_VALUES) is True
    collector.drain()
    assert collector.totals == dict(dict.fromkeys(COUNTERS, 3))


def test_an_interval_of_many_keys_waits_for_room_instead_of_being_dropped(pipeline, caplog):
    """The master's lines for Carbon outgrow the channel: the rest goes when there is room."""
    channels, _, collector = pipeline
    collector.key_interval = {"key-%05d" % n: [n, 1] for n in range(10000)}
    collector.flush(workers=[], timestamp=1700000000)
    assert collector.pending, "the channel took 20,000 lines at once: the test proves nothing"
    received = []
    for _ in range(1000):  # a worker reading while the master's loop sends the rest
        try:
            received.append(channels.outbox_out.recv(1 << 20))
        except BlockingIOError:
            if not collector.pending:
                break
            collector.send_pending()
    lines = b"".join(received).splitlines()
    assert len(lines) == len(COUNTERS) + len(GAUGES) + 1 + 2 * 10000
    assert b"p.keys.key-09999.linesForwarded 9999 1700000000" in lines
    assert "not sent" not in caplog.text and "dropped" not in caplog.text


def test_each_destination_has_its_counters_from_the_start_and_they_add_up():
    from amproxy.placement import parse_destinations
    channels = StatsChannels()
    destinations = parse_destinations("127.0.0.1:2103:a,[::1]:2203:b")
    collector = StatsCollector(channels, "p", per_key=False, destinations=destinations)
    worker = WorkerStats(channels, per_key=False)
    node = "destinations.127_0_0_1_2103_a"
    assert worker.report({node + ".linesSent": 5}, dict(GAUGE_VALUES, **{
        node + ".bufferedLines": 7})) is True
    assert worker.report({node + ".linesSent": 8}, GAUGE_VALUES) is True
    collector.drain()
    assert collector.totals[node + ".linesSent"] == 8
    collector.flush(workers=[], timestamp=1700000000)
    lines = channels.outbox_out.recv(1 << 20).splitlines()
    assert b"p.destinations.127_0_0_1_2103_a.linesSent 8 1700000000" in lines
    # The other has sent nothing yet: its counters are 0, not missing.
    assert b"p.destinations.___1__2203_b.linesSent 0 1700000000" in lines
    assert b"p.destinations.___1__2203_b.carbonReconnects 0 1700000000" in lines
