"""The Carbon sender against a real socket, with a clock the test moves."""
import logging
import selectors
import socket
import time

import pytest

from amproxy.buffer import MERGE_BYTES
from amproxy.carbon import CarbonSender


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def carbon_listener():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(4)
    sock.settimeout(5)
    yield sock
    sock.close()


def pump(selector, until, timeout=5.0):
    """Dispatch the sender's socket events until ``until()`` holds."""
    deadline = time.monotonic() + timeout
    while not until():
        if time.monotonic() > deadline:
            raise TimeoutError("the sender never reached the expected state")
        for key, mask in selector.select(0.05):
            key.data(mask)


def read_exactly(conn, size):
    conn.settimeout(5)
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        assert chunk, "the sender closed the connection early"
        data += chunk
    return data


def chunk_of(start, count, name=b"m"):
    return b"".join(b"%s.%d %d 1700000000\n" % (name, i, i) for i in range(start, start + count))


def connected_sender(listener, **options):
    clock = FakeClock()
    selector = selectors.DefaultSelector()
    sender = CarbonSender(listener.getsockname(), selector, clock, **options)
    sender.flush()
    pump(selector, lambda: sender.connected)
    conn, _ = listener.accept()
    return sender, selector, clock, conn


def drop(selector, sender, conn):
    """Carbon closes the connection; wait until the sender has noticed."""
    conn.close()
    pump(selector, lambda: not sender.connected)


def reconnected(sender, selector, listener):
    """Let the sender connect again (its backoff is up); return Carbon's side."""
    sender.flush()
    pump(selector, lambda: sender.connected)
    return listener.accept()[0]


def test_rate_limited_backlog_is_declared_delivered_when_the_last_chunk_goes(
        carbon_listener, caplog):
    caplog.set_level(logging.INFO, logger="amproxy.carbon")
    sender, selector, clock, first = connected_sender(carbon_listener, buffer_lines=1000,
                                                      replay_rate=100)
    drop(selector, sender, first)

    # Each chunk is over half of MERGE_BYTES: the buffer keeps them apart.
    chunks = [chunk_of(n * 100, 100, b"m" * 100) for n in range(3)]
    assert min(map(len, chunks)) > MERGE_BYTES // 2
    for data in chunks:
        sender.enqueue(data, 100)
    clock.now += 60
    second = reconnected(sender, selector, carbon_listener)
    assert "sending the backlog" in caplog.text

    received = b""
    for data in chunks:
        assert sender.seconds_to_next_write(clock.now) is not None
        clock.now += 1.0  # exactly enough tokens for one chunk of 100 lines
        sender.flush()
        received += read_exactly(second, len(data))
    assert received == b"".join(chunks)
    # The tokens are spent, yet the empty backlog must be noticed at once:
    # nothing would call the sender again to notice it later.
    assert "backlog delivered to Carbon" in caplog.text
    assert sender.memory_empty and sender.seconds_to_next_write(clock.now) is None
    second.close()
    sender.close()
    selector.close()


def send_now(sender, conn, data, lines):
    sender.enqueue(data, lines)
    sender.flush()
    assert read_exactly(conn, len(data)) == data


def test_lines_sent_on_a_connection_that_never_proved_healthy_go_again(carbon_listener):
    """However old: a front that accepts and drops every connection delivered nothing."""
    sender, selector, clock, conn = connected_sender(
        carbon_listener, buffer_lines=1000, resend_window=5.0)
    lines = chunk_of(0, 10)
    send_now(sender, conn, lines, 10)
    clock.now += 0.5
    drop(selector, sender, conn)  # before the connection proved healthy
    clock.now += 10  # far past the resend window
    conn = reconnected(sender, selector, carbon_listener)
    assert read_exactly(conn, len(lines)) == lines  # resent, with its first send time
    drop(selector, sender, conn)  # and dropped again before it proved healthy
    assert sender.queued_lines == 10, "lines given up as delivered on a dead connection"
    sender.close()


def test_after_a_break_the_lines_of_the_resend_window_go_again(carbon_listener, caplog):
    sender, selector, clock, conn = connected_sender(
        carbon_listener, buffer_lines=1000, resend_window=5.0)
    old, kept, newest = chunk_of(0, 10), chunk_of(10, 10), chunk_of(20, 10)
    send_now(sender, conn, old, 10)
    clock.now += 3
    send_now(sender, conn, kept, 10)
    clock.now += 3  # ``old`` is now 6 s old: out of the window
    send_now(sender, conn, newest, 10)
    drop(selector, sender, conn)  # Carbon dies with those lines in memory
    clock.now += 1
    again = reconnected(sender, selector, carbon_listener)
    assert read_exactly(again, len(kept + newest)) == kept + newest
    assert sender.reconnects == 1
    assert "cannot hold --resend-window" not in caplog.text
    again.close()
    sender.close()


def test_a_buffer_too_small_for_the_resend_window_is_logged_once(carbon_listener, caplog):
    sender, selector, clock, conn = connected_sender(
        carbon_listener, buffer_lines=100, resend_window=5.0)
    clock.now += 2
    sender.flush()  # the connection has proved healthy: sent lines go to the window
    for n in range(5):
        send_now(sender, conn, chunk_of(n * 100, 100), 100)
        clock.now += 0.1
    assert caplog.text.count("--buffer-size cannot hold --resend-window") == 1
    conn.close()
    sender.close()


def test_resent_lines_keep_their_first_send_time(carbon_listener):
    """A line resent after a break must leave the window like any other, or it loops."""
    sender, selector, clock, conn = connected_sender(
        carbon_listener, buffer_lines=1000, resend_window=5.0)
    first = chunk_of(0, 10)
    send_now(sender, conn, first, 10)
    drop(selector, sender, conn)
    clock.now += 3
    again = reconnected(sender, selector, carbon_listener)
    assert read_exactly(again, len(first)) == first  # resent, 3 s after its first send
    clock.now += 3  # 6 s after the first send: out of the window
    sender.flush()  # and this connection has stayed up: what it sent counts as sent
    drop(selector, sender, again)
    clock.now += 1
    third = reconnected(sender, selector, carbon_listener)
    newest = chunk_of(10, 5)
    send_now(sender, third, newest, 5)  # the next bytes are the new lines, not `first`
    third.close()
    sender.close()


def test_reading_resumes_only_below_the_low_watermark(carbon_listener):
    sender, selector, clock, conn = connected_sender(carbon_listener, buffer_lines=100)
    drop(selector, sender, conn)
    for n in range(11):  # chunks of 10 long lines, each over half of MERGE_BYTES: not merged
        sender.enqueue(chunk_of(n * 10, 10, b"m" * 1000), 10)
    assert sender.full
    for _ in range(2):
        sender.buffer.popleft()  # delivered: 90% full
    sender.flush()
    assert sender.full, "resumed at 90%: the next read would pause again"
    sender.buffer.popleft()
    sender.flush()
    assert not sender.full  # 80%
    sender.close()


def test_a_connection_that_breaks_again_at_once_backs_off(carbon_listener):
    """Reconnects after quick breaks wait longer each time, not 0.1 s for ever."""
    sender, selector, clock, conn = connected_sender(carbon_listener, buffer_lines=100)
    delays = []
    for _ in range(4):
        drop(selector, sender, conn)
        delays.append(sender.seconds_to_next_write(clock.now))
        clock.now += delays[-1]
        conn = reconnected(sender, selector, carbon_listener)
    assert delays == sorted(delays) and delays[-1] >= 4 * delays[0], delays
    clock.now += 2  # a connection that stays up resets the backoff
    sender.flush()
    drop(selector, sender, conn)
    assert sender.seconds_to_next_write(clock.now) == pytest.approx(delays[0])
    sender.close()


def test_a_stop_right_after_a_reconnect_keeps_what_that_connection_may_not_have_delivered(
        carbon_listener, tmp_path):
    from amproxy.buffer import Spool
    spool = Spool(str(tmp_path / "worker-0"), 1 << 20).open()
    sender, selector, clock, conn = connected_sender(carbon_listener, buffer_lines=1000,
                                                     resend_window=5.0, spool=spool)
    lines = chunk_of(0, 10)
    send_now(sender, conn, lines, 10)  # on a connection not yet up for a second
    assert not sender.memory_empty  # a graceful stop waits for it to prove healthy
    assert sender.save_to_spool() == 0
    assert spool.read_chunk() == (lines, 10)
    conn.close()
    sender.close()
    spool.close()
