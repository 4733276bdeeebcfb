import fcntl
import os

from amproxy.buffer import MERGE_BYTES, LineBuffer, Spool


def test_line_buffer_fifo_bounded_in_lines():
    buf = LineBuffer(3)
    assert buf.has_room(3) and not buf.has_room(4)
    buf.append(b"a 1 1\nb 2 2\n", 2)
    buf.append(b"c 3 3\n", 1)
    assert len(buf) == 3 and not buf.has_room()
    # Small chunks are merged: one write to Carbon for both.
    assert buf.popleft() == (b"a 1 1\nb 2 2\nc 3 3\n", 3)
    buf.append(b"c 3 3\n", 1)
    buf.appendleft(b"z 0 0\n", 1)
    assert buf.pop_all() == (b"z 0 0\nc 3 3\n", 2)
    assert not buf and len(buf) == 0 and buf.pop_all() == (b"", 0)


def test_line_buffer_merges_small_chunks_only_up_to_a_bound():
    buf = LineBuffer(10 ** 6)
    big = b"m 1 1\n" * (MERGE_BYTES // 6)
    buf.append(big, MERGE_BYTES // 6)
    buf.append(b"n 2 2\n", 1)  # would make the last chunk too large: a chunk of its own
    buf.append(b"o 3 3\n", 1)
    assert (len(buf), buf.bytes) == (MERGE_BYTES // 6 + 2, len(big) + 12)
    assert buf.popleft() == (big, MERGE_BYTES // 6)
    assert buf.popleft() == (b"n 2 2\no 3 3\n", 2)
    assert not buf


def lines(start, count):
    return b"".join(b"m.%d %d 1700000000\n" % (i, i) for i in range(start, start + count))


def read_all(spool, limit=1 << 18):
    out = []
    while True:
        chunk = spool.read_chunk(limit)
        if chunk is None:
            return b"".join(out)
        data, count = chunk
        assert data.endswith(b"\n") and data.count(b"\n") == count
        out.append(data)


def test_spool_keeps_order_across_segments(tmp_path, monkeypatch):
    monkeypatch.setattr("amproxy.buffer.SEGMENT_BYTES", 1000)
    spool = Spool(str(tmp_path / "worker-0"), 10 << 20).open()
    written = b""
    for n in range(20):
        data = lines(n * 50, 50)
        spool.append(data)
        written += data
    assert spool.bytes == len(written)
    assert len([f for f in os.listdir(tmp_path / "worker-0") if f.endswith(".spool")]) > 5
    assert read_all(spool, limit=777) == written
    assert spool.bytes == 0 and not spool
    assert not [f for f in os.listdir(tmp_path / "worker-0") if f.endswith(".spool")]
    # Usable again after being emptied.
    spool.append(lines(0, 3))
    assert read_all(spool) == lines(0, 3)
    spool.close()


def test_spool_is_bounded(tmp_path):
    spool = Spool(str(tmp_path / "worker-0"), 100).open()
    assert spool.has_room(100) and not spool.has_room(101)
    spool.append(b"x" * 60 + b"\n")
    assert not spool.has_room(40)


def test_spool_survives_its_worker(tmp_path):
    spool = Spool(str(tmp_path / "worker-0"), 1 << 20).open()
    spool.append(lines(0, 100))
    first = spool.read_chunk(200)  # read but the worker dies before the rest
    spool._lock_fd and os.close(spool._lock_fd)  # as a SIGKILL would release it
    successor = Spool(str(tmp_path / "worker-0"), 1 << 20).open()
    data = read_all(successor)
    # The unfinished segment is sent again whole: at least once.
    assert data == lines(0, 100)
    assert first[0] in data


def test_a_segment_read_to_its_end_stays_until_released(tmp_path):
    spool = Spool(str(tmp_path / "worker-0"), 1 << 20).open()
    spool.append(lines(0, 10))
    last = spool.read_chunk()  # the last chunk, still on its way to Carbon
    assert last == (lines(0, 10), 10) and not spool
    spool._lock_fd and os.close(spool._lock_fd)  # the worker dies before sending it
    successor = Spool(str(tmp_path / "worker-0"), 1 << 20).open()
    assert successor.read_chunk() == last
    successor.release_read()  # sent
    assert [f for f in os.listdir(successor.directory) if f.endswith(".spool")] == []
    successor.append(lines(10, 5))
    assert read_all(successor) == lines(10, 5)


def test_orphaned_spools_are_adopted_but_live_ones_are_not(tmp_path):
    live = Spool(str(tmp_path / "worker-1"), 1 << 20).open()
    live.append(lines(100, 10))
    orphan = Spool(str(tmp_path / "worker-3"), 1 << 20).open()
    orphan.append(lines(0, 10))
    orphan.close()
    (tmp_path / "not-a-spool").mkdir()
    spool = Spool(str(tmp_path / "worker-0"), 1 << 20).open()
    assert read_all(spool) == lines(0, 10)
    assert read_all(live) == lines(100, 10)
    live.close()
    spool.close()


def test_spool_directory_is_locked(tmp_path):
    Spool(str(tmp_path / "worker-0"), 1 << 20).open()
    fd = os.open(str(tmp_path / "worker-0" / "lock"), os.O_RDWR)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = False
        except BlockingIOError:
            locked = True
        assert locked
    finally:
        os.close(fd)


def test_a_worker_whose_spool_is_held_takes_another_and_adopts_it_later(tmp_path):
    """An upgrade: the old master's worker 0 still holds worker-0 (draining) when the
    new master's worker 0 starts; it takes worker-0.1 instead of waiting, and adopts
    what the old one spooled once it let go."""
    old = Spool.of_worker(str(tmp_path), 0, 1 << 20)
    new = Spool.of_worker(str(tmp_path), 0, 1 << 20)
    assert os.path.basename(old.directory) == "worker-0"
    assert os.path.basename(new.directory) == "worker-0.1"
    new.append(lines(100, 5))
    old.append(lines(0, 10))  # as it stops, Carbon being down
    assert new.adopt_orphans() == 0  # still held
    old.close()
    assert new.adopt_orphans() == len(lines(0, 10))
    new.append(lines(200, 5))  # after the adopted ones, in a segment of its own
    assert read_all(new) == lines(100, 5) + lines(0, 10) + lines(200, 5)
    assert not [name for name in os.listdir(str(tmp_path / "worker-0"))
                if name.endswith(".spool")]
    new.close()
