"""Finding the line Carbon drops the connection on, against a fake Carbon that does so."""
import os
import selectors
import socket
import threading
import time

import pytest

from amproxy.carbon import CarbonSender
from amproxy.deadletter import DEAD_LETTER_FILE, DeadLetters, PoisonSearch


def lines_of(start, count, poison_at=()):
    return [b"m.%d %d 1700000000\n" % (i, i) if i not in poison_at else
            b"m.poison%d 1 1700000000\n" % i for i in range(start, start + count)]


def search_for(suspects, breaks):
    """Drive a PoisonSearch as the sender does; return (culprit, probes, delivered, rest)."""
    search = PoisonSearch(suspects, probe_wait=0.5)
    delivered, probes = [], 0
    while not search.done:
        data, _ = search.next_probe()
        probes += 1
        if breaks(data):
            search.failed()
        else:
            delivered.extend(search.passed())
    return search.culprit, probes, delivered, search.suspects


def test_search_finds_one_line_among_chunks_in_logarithmic_probes():
    chunks = []
    for n in range(64):
        data = b"".join(lines_of(n * 100, 100, poison_at={4242}))
        chunks.append((float(n), data, 100))
    culprit, probes, delivered, rest = search_for(chunks, lambda data: b"m.poison4242 " in data)
    assert culprit == (42.0, b"m.poison4242 1 1700000000\n", 1)
    assert probes <= 6 + 7 + 2, probes  # log2(64 chunks) + log2(100 lines) + the control
    # Everything before it is delivered, everything after it is left to send, in order.
    everything = b"".join(d for _, d, _ in delivered) + culprit[1] + \
        b"".join(d for _, d, _ in rest)
    assert everything == b"".join(d for _, d, _ in chunks)


def test_search_without_a_culprit_delivers_everything():
    chunks = [(1.0, b"".join(lines_of(n * 10, 10)), 10) for n in range(5)]
    culprit, _, delivered, rest = search_for(chunks, lambda data: False)
    assert culprit is None and not rest
    assert b"".join(d for _, d, _ in delivered) == b"".join(d for _, d, _ in chunks)


def test_a_carbon_that_drops_every_connection_blames_no_line():
    """An empty control probe breaks too: the search gives up and keeps every line."""
    chunks = [(1.0, b"".join(lines_of(n * 10, 10)), 10) for n in range(5)]
    culprit, _, delivered, rest = search_for(chunks, lambda data: True)
    assert culprit is None and not delivered
    assert b"".join(d for _, d, _ in rest) == b"".join(d for _, d, _ in chunks)


def test_dead_letters_are_appended_whole_and_created_0640(tmp_path):
    letters = DeadLetters(str(tmp_path))
    letters.add(b"a.\xff 1 2\n", "127.0.0.1:2003")
    letters.add(b"b 1 2", "127.0.0.1:2003")
    path = tmp_path / DEAD_LETTER_FILE
    assert path.read_bytes() == b"a.\xff 1 2\nb 1 2\n"
    assert os.stat(path).st_mode & 0o777 == 0o640
    assert letters.count == 2
    assert DeadLetters("").count == 0


class PickyCarbon:
    """Accepts lines, and drops the connection at once on a line containing POISON.

    ``read_after``: seconds it waits before reading a new connection (a busy
    Carbon); ``drop_all``: it drops every connection at once (a load balancer
    with no backend).
    """

    def __init__(self, read_after=0.0, drop_all=False):
        self.read_after = read_after
        self.drop_all = drop_all
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.listener.settimeout(0.2)
        self.received = []
        self.connections = 0
        self.running = True
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        while self.running:
            try:
                conn, _ = self.listener.accept()
            except socket.timeout:
                continue
            self.connections += 1
            buffered = b""
            conn.settimeout(0.2)
            if self.drop_all:
                conn.close()
                continue
            if self.read_after:
                time.sleep(self.read_after)  # the fake's behaviour, not a wait for a result
            with conn:
                while self.running:
                    try:
                        data = conn.recv(65536)
                    except socket.timeout:
                        continue
                    if not data:
                        break
                    buffered += data
                    *lines, buffered = buffered.split(b"\n")
                    for line in lines:
                        if b"POISON" in line:
                            break
                        self.received.append(line)
                    else:
                        continue
                    break  # like carbon-cache: the rest of this read is lost

    def stop(self):
        self.running = False
        self.thread.join(5)
        self.listener.close()


def run_sender(carbon, tmp_path, wire, seconds, done):
    """Queue ``wire`` lines (100 a chunk) and pump the sender until ``done(sender)`` or timeout."""
    selector = selectors.DefaultSelector()
    sender = CarbonSender(carbon.listener.getsockname(), selector, time.monotonic,
                          buffer_lines=100000, resend_window=5.0,
                          dead_letters=DeadLetters(str(tmp_path)))
    for start in range(0, len(wire), 100):
        chunk = wire[start:start + 100]
        sender.enqueue(b"\n".join(chunk) + b"\n", len(chunk))
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not done(sender):
        sender.flush()
        timeout = sender.seconds_to_next_write(time.monotonic())
        for key, mask in selector.select(0.05 if timeout is None else min(timeout, 0.05)):
            key.data(mask)
    return sender


GOOD = [b"m.%d %d 1700000000" % (i, i) for i in range(3000)]
POISON = b"m.POISON 1 1700000000"


@pytest.mark.parametrize("read_after", [0.0, 1.3])
def test_a_poison_line_is_set_aside_and_everything_else_is_delivered(tmp_path, read_after):
    """Also when Carbon reads late: timing alone cannot tell poison from an outage."""
    carbon = PickyCarbon(read_after=read_after)
    try:
        sender = run_sender(carbon, tmp_path, GOOD[:1234] + [POISON] + GOOD[1234:], 90,
                            lambda s: s.dead_letters.count and s.memory_empty and
                            set(GOOD) <= set(carbon.received))
        try:
            assert set(GOOD) <= set(carbon.received), "%d good lines missing" % (
                len(set(GOOD) - set(carbon.received)))
            assert (tmp_path / DEAD_LETTER_FILE).read_bytes() == POISON + b"\n"
            assert sender.dead_letters.count == 1
            # Bounded: two breaks, then about log2(30 chunks) + log2(100 lines) probes.
            assert carbon.connections <= 22, carbon.connections
        finally:
            sender.close()
    finally:
        carbon.stop()


def test_a_carbon_that_drops_every_connection_loses_and_blames_nothing(tmp_path, caplog):
    """An HAProxy with no live backend accepts and closes: no line is poison."""
    carbon = PickyCarbon(drop_all=True)
    try:
        sender = run_sender(carbon, tmp_path, GOOD[:500], 8, lambda s: False)
        try:
            assert sender.dead_letters.count == 0
            assert not (tmp_path / DEAD_LETTER_FILE).exists()
            assert sender.queued_lines == 500  # everything still held
            assert "no line is to blame" in caplog.text
        finally:
            sender.close()
    finally:
        carbon.stop()
