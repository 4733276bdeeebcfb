"""Per-key rate limits, shared by the workers: token buckets in shared memory."""
import os

from amproxy.auth import AuthKey, AuthDB
from amproxy.protocol import filter_lines, signed_line
from amproxy.ratelimit import RateLimiter, RateTable


def take_all(table, slot, rate):
    """What a batch of many lines gets: the bucket's content, then empty."""
    granted = int(table.available(slot, rate))
    table.spend(slot, rate, granted)
    return granted


def test_a_bucket_gives_a_burst_of_one_second_then_the_rate():
    table = RateTable()
    slot = table.slot_of(b"dev1")
    table.now = 1000.0
    assert take_all(table, slot, 10) == 10  # the burst
    assert take_all(table, slot, 10) == 0
    table.now = 1000.5
    assert take_all(table, slot, 10) == 5
    table.now = 1100.0  # a long pause refills one second's worth, no more
    assert take_all(table, slot, 10) == 10


def test_keys_have_buckets_of_their_own():
    table = RateTable()
    slots = {table.slot_of(b"dev%d" % i) for i in range(5000)}
    assert len(slots) == 5000
    assert table.slot_of(b"dev7") == table.slot_of(b"dev7")


def test_workers_share_the_bucket():
    table = RateTable()
    table.now = 2000.0
    slot = table.slot_of(b"dev1")
    pid = os.fork()
    if pid == 0:  # another worker, forked after the table was made
        table.slot_of(b"dev1")
        table.spend(slot, 20, 15)
        os._exit(0)
    os.waitpid(pid, 0)
    assert take_all(table, slot, 20) == 5


def test_lines_over_a_keys_rate_are_rejected_as_rate_limited():
    keys = {b"fast": AuthKey("fast", "s", ["a.b"], max_rate=3.0),
            b"free": AuthKey("free", "t", ["a.b"])}
    db = AuthDB(keys.values())
    limiter = RateLimiter(RateTable())
    now = 1764201600
    lines = [signed_line("s", "a.b", i, now, "fast").rstrip(b"\n") for i in range(10)]
    lines += [signed_line("t", "a.b", i, now, "free").rstrip(b"\n") for i in range(10)]
    rejected = []
    accepted = filter_lines(lines, db.keys, now, 300, lambda r, k, m: rejected.append((r, k)),
                            rate_limiter=limiter.for_batch(db, 0))
    assert len(accepted) == 3 + 10
    assert rejected == [("rateLimited", b"fast")] * 7
    # --key-max-rate covers the keys without a max_rate of their own.
    assert limiter.for_batch(AuthDB([keys[b"free"]]), 0) is None
    rejected.clear()
    accepted = filter_lines(lines[10:], db.keys, now, 300,
                            lambda r, k, m: rejected.append(r),
                            rate_limiter=RateLimiter(RateTable()).for_batch(db, 4))
    assert len(accepted) == 4 and rejected == ["rateLimited"] * 6
