"""The device table: each key's recent history, shared by the workers."""
import os
import time

import pytest

from amproxy.devices import SLOT_SIZE, DeviceTable, Rejections
from amproxy.protocol import BAD_SIGNATURE, MALFORMED, RATE_LIMITED, SKEW, UNKNOWN_KEY

T0 = 1764201600.0


@pytest.fixture
def table():
    table = DeviceTable(100)
    yield table
    table.close()


def tally(*rejections):
    """Rejections from (reason, at[, skew[, old_secret]]) tuples."""
    result = Rejections()
    for rejection in rejections:
        result.add(*rejection)
    return result


def in_child(body):
    """Run ``body`` in a forked process (a worker forked after the table was made)."""
    pid = os.fork()
    if pid == 0:
        try:
            body()
        except BaseException:
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_100_000_keys_fit_in_16_mb_and_each_gets_a_slot():
    table = DeviceTable(100_000)
    try:
        assert SLOT_SIZE == 104
        assert table.capacity == 150_000
        assert table.size == table.capacity * SLOT_SIZE <= 16_000_000
        assert os.fstat(table._fd).st_size == len(table._memory) == table.size
        keys = [b"device-%d" % i for i in range(100_000)]
        for start in range(0, len(keys), 20_000):
            table.record(0, T0, {k: 1 for k in keys[start:start + 20_000]}, {}, {})
        assert table.full_misses == 0
        assert table.read(keys[-1]).accepted == 1
    finally:
        table.close()


def test_a_keys_state_round_trips(table):
    table.record(0, T0, {b"dev": 7}, {}, {b"dev": ("192.0.2.7", True)})
    table.record(0, T0 + 1, {}, {b"dev": tally((MALFORMED, T0 + 0.2),
                                              (SKEW, T0 + 0.5, 42))}, {})
    state = table.read(b"dev")
    assert state.accepted == 7
    assert state.last_accepted == T0
    assert state.last_rejected == T0 + 1  # when recorded: a summary counts it once
    assert state.last_reason == SKEW
    assert state.rejected_since == T0
    assert state.rejected == {MALFORMED: 1, SKEW: 1}
    assert state.skew == 42
    assert state.old_secret is False
    assert state.address == "192.0.2.7" and state.listener == "tls"
    assert state.connected is False  # the second record did not list it
    assert state._asdict() == {
        "key": "dev", "accepted": 7, "last_accepted": T0, "last_rejected": T0 + 1,
        "last_reason": "skew", "rejected_since": T0, "rejected": {"malformed": 1, "skew": 1},
        "skew": 42, "old_secret": False, "previous_secret_expires": None,
        "address": "192.0.2.7", "listener": "tls", "connected": False, "tracked": True}
    assert table.read(b"never") is None


def test_counts_add_across_records_and_processes(table):
    table.record(0, T0, {b"dev": 5}, {b"dev": tally((RATE_LIMITED, T0))}, {})
    table.record(0, T0 + 1, {b"dev": 2}, {}, {})

    def worker():  # another worker, forked after the table was made
        table.record(1, T0 + 2, {b"dev": 10, b"new": 3},
                     {b"dev": tally((RATE_LIMITED, T0 + 1.5), (RATE_LIMITED, T0 + 1.6))}, {})

    in_child(worker)
    state = table.read(b"dev")
    assert state.accepted == 17
    assert state.rejected == {RATE_LIMITED: 3}
    assert state.last_accepted == T0 + 2
    assert table.read(b"new").accepted == 3  # claimed by the child, found by the parent


def test_a_key_is_connected_while_any_worker_holds_it(table):
    table.record(0, T0, {}, {}, {b"dev": ("192.0.2.1", False)})
    table.record(1, T0, {}, {}, {b"dev": ("192.0.2.2", False)})
    assert table.read(b"dev").connected
    table.record(0, T0 + 1, {}, {}, {})
    state = table.read(b"dev")
    assert state.connected and state.address == "192.0.2.2" and state.listener == "plain"
    table.record(1, T0 + 2, {}, {}, {})
    assert not table.read(b"dev").connected


def test_a_new_worker_process_clears_what_its_predecessor_marked(table):
    in_child(lambda: table.record(2, T0, {}, {}, {b"dev": ("192.0.2.1", False)}))
    assert table.read(b"dev").connected  # the worker died without a word
    in_child(lambda: table.record(2, T0 + 5, {}, {}, {}))  # its replacement
    assert not table.read(b"dev").connected


def test_forget_except_drops_revoked_keys_and_keeps_the_others():
    table = DeviceTable(400)
    try:
        keys = [b"dev%d" % i for i in range(500)]
        # Recorded by a worker: the parent finds every slot by probing.
        in_child(lambda: table.record(0, T0, {k: i + 1 for i, k in enumerate(keys)}, {}, {}))
        kept = keys[::2]
        assert table.forget_except(kept) == 250
        for i, key in enumerate(keys):
            state = table.read(key)
            if key in kept:
                assert state.accepted == i + 1
            else:
                assert state is None
        # A worker that knew the slot of a revoked key starts it afresh.
        table.record(1, T0 + 1, {keys[1]: 1, b"other": 1}, {}, {})
        assert table.read(keys[1]).accepted == 1
        assert table.read(keys[2]).accepted == 3
    finally:
        table.close()


def test_a_worker_that_knew_a_forgotten_slot_does_not_write_into_it(table):
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            table.record(0, T0, {b"revoked": 5}, {}, {})  # remembers its slot
            os.read(reader, 1)  # the master forgets it meanwhile
            table.record(0, T0 + 1, {b"revoked": 1}, {}, {})
        finally:
            os._exit(0)
    time.sleep(0.2)
    table.forget_except([b"other"])
    os.write(writer, b"x")
    os.waitpid(pid, 0)
    assert table.read(b"revoked").accepted == 1  # a new slot, from zero


def test_workers_record_one_at_a_time(table):
    """The lock on the memfd is per process: a forked worker waits for another's record."""
    reader, writer = os.pipe()
    table._lock()  # the parent is a worker in the middle of its record
    pid = os.fork()
    if pid == 0:
        try:
            table.record(1, T0, {b"dev": 1}, {}, {})
            os.write(writer, b"x")
        finally:
            os._exit(0)
    try:
        time.sleep(0.3)
        assert table.read(b"dev") is None  # still waiting for the lock
    finally:
        table._unlock()
    assert os.read(reader, 1) == b"x"
    os.waitpid(pid, 0)
    assert table.read(b"dev").accepted == 1


def test_rejected_since_is_when_the_current_run_of_rejections_began(table):
    table.record(0, T0, {b"dev": 1}, {}, {})
    assert table.read(b"dev").rejected_since is None
    table.record(0, T0 + 10, {}, {b"dev": tally((MALFORMED, T0 + 9.5))}, {})
    assert table.read(b"dev").rejected_since == T0 + 9
    table.record(0, T0 + 20, {}, {b"dev": tally((MALFORMED, T0 + 19.5))}, {})
    state = table.read(b"dev")
    assert state.rejected_since == T0 + 9 and state.last_rejected == T0 + 20
    table.record(0, T0 + 30, {b"dev": 1}, {}, {})
    assert table.read(b"dev").rejected_since is None
    table.record(0, T0 + 40, {}, {b"dev": tally((SKEW, T0 + 38.2, 5), (SKEW, T0 + 39.1, 6))}, {})
    assert table.read(b"dev").rejected_since == T0 + 38
    # Accepted and rejected lines in one second: the acceptance wins...
    table.record(0, T0 + 50, {b"dev": 1}, {b"dev": tally((SKEW, T0 + 49.5, 5))}, {})
    assert table.read(b"dev").rejected_since is None
    # ...unless the rejection came after it.
    table.record(0, T0 + 60, {b"dev": 1}, {b"dev": tally((SKEW, T0 + 61, 5))}, {})
    assert table.read(b"dev").rejected_since == T0 + 61
    # Another worker's rejections from before the last acceptance start no run.
    table.record(0, T0 + 70, {b"dev": 1}, {}, {})
    table.record(1, T0 + 71, {}, {b"dev": tally((MALFORMED, T0 + 69.5))}, {})
    state = table.read(b"dev")
    assert state.rejected_since is None and state.last_rejected == T0 + 71


def test_skew_sign_and_old_secret(table):
    table.record(0, T0, {}, {b"dev": tally((SKEW, T0, 120))}, {})
    assert table.read(b"dev").skew == 120  # the device is ahead
    table.record(0, T0 + 1, {}, {b"dev": tally((SKEW, T0 + 1, -3600))}, {})
    assert table.read(b"dev").skew == -3600  # behind
    table.record(0, T0 + 2, {}, {b"dev": tally((MALFORMED, T0 + 2))}, {})
    assert table.read(b"dev").skew == -3600  # the last skew rejection's
    assert table.read(b"dev").old_secret is False
    table.record(0, T0 + 3, {}, {b"dev": tally((BAD_SIGNATURE, T0 + 3, None, True))}, {})
    assert table.read(b"dev").old_secret is True
    table.record(0, T0 + 4, {}, {b"dev": tally((SKEW, T0 + 4, 1))}, {})
    assert table.read(b"dev").old_secret is True  # not a badSignature line: unchanged
    table.record(0, T0 + 5, {}, {b"dev": tally((BAD_SIGNATURE, T0 + 5, None, True),
                                               (BAD_SIGNATURE, T0 + 5.5))}, {})
    assert table.read(b"dev").old_secret is False  # the last one was not
    table.record(0, T0 + 6, {}, {b"dev": tally((SKEW, T0 + 6, 10 ** 12))}, {})
    assert table.read(b"dev").skew == 2 ** 31 - 1  # bounded, not an error


@pytest.mark.parametrize("address, shown", [
    ("192.0.2.10", "192.0.2.10"), ("2001:db8::1", "2001:db8::1"),
    ("2001:0db8:0000:0000:0000:0000:0000:0001", "2001:db8::1"),
    ("::ffff:198.51.100.3", "198.51.100.3"),  # a dual-stack socket's IPv4 peer
    ("fe80::1:2:3:4", "fe80::1:2:3:4"), ("::1", "::1"), ("0.0.0.0", "0.0.0.0"),
    ("unix:/run/socket", None)])
def test_addresses_round_trip(table, address, shown):
    table.record(0, T0, {}, {}, {b"dev": ("203.0.113.1", False)})
    table.record(0, T0 + 1, {}, {}, {b"dev": (address, True)})
    state = table.read(b"dev")
    assert state.address == shown and state.listener == "tls" and state.connected


def test_summary_counts_seen_silent_and_rejected_only(table):
    now = T0 + 10_000
    table.created = now - 1000
    table.record(0, now - 10, {b"fresh": 1}, {b"fresh": tally((MALFORMED, now - 10))}, {})
    table.record(0, now - 500, {b"stale": 1, b"failing": 1}, {}, {})
    table.record(0, now - 5, {}, {b"failing": tally((SKEW, now - 5, 60)),
                                  b"new-failing": tally((BAD_SIGNATURE, now - 5))}, {})
    table.record(0, now - 200, {b"quiet": 1}, {}, {})
    keys = [b"fresh", b"stale", b"failing", b"new-failing", b"quiet", b"never"]
    table.forget_except(keys)  # the auth file's keys, as at a reload
    # silent (> 300 s): stale, failing, new-failing (never accepted), never
    assert table.summary(now, 60, 300) == (1, 4, 2)
    assert table.summary(now, 600, 300) == (4, 4, 1)  # failing, stale, quiet seen too
    table.created = now - 100  # too young for a key never seen to be silent
    assert table.summary(now, 60, 300) == (1, 2, 2)
    table.forget_except([b"fresh"])
    assert table.summary(now, 60, 300) == (1, 0, 0)


def test_the_current_keys_are_numbers_and_a_process_remembers_a_bounded_few(monkeypatch):
    from amproxy import devices
    monkeypatch.setattr(devices, "_CACHED_KEYS", 100)
    keys = [b"device-%d" % i for i in range(1000)]
    table = DeviceTable(len(keys), keys)
    try:
        assert len(table.current) == 1000 and table.current.itemsize == 8
        assert table.summary(T0, 60, 300) == (0, 0, 0)  # no key silent yet: a new table
        for start in range(0, 1000, 50):
            table.record(0, T0, {k: 1 for k in keys[start:start + 50]}, {}, {})
        assert len(table._hashes) <= 100 and len(table._slots) <= 100
        assert all(table.read(k).accepted == 1 for k in keys)
        table.record(0, T0 + 1, {k: 1 for k in keys}, {}, {})
        assert all(table.read(k).accepted == 2 for k in keys)
        assert table.full_misses == 0
    finally:
        table.close()


def test_unknown_keys_claim_no_slot(table):
    table.record(0, T0, {}, {b"made-up": tally((UNKNOWN_KEY, T0))}, {})
    assert table.read(b"made-up") is None


def test_rejection_counts_saturate(table):
    rejections = Rejections()
    rejections.add(MALFORMED, T0, lines=2 ** 32 + 5)
    table.record(0, T0, {}, {b"dev": rejections}, {})
    assert table.read(b"dev").rejected == {MALFORMED: 2 ** 32 - 1}
    with pytest.raises(ValueError):
        rejections.add("noSuchReason", T0)


def test_a_small_table_has_room_for_the_keys_added_after_the_start():
    table = DeviceTable(0)  # a package's first start: no key yet
    try:
        assert table.capacity == 65536  # about 43,000 keys at 2/3 load
        keys = [b"added-%d" % i for i in range(40000)]
        table.record(0, T0, {k: 1 for k in keys}, {}, {})
        assert table.full_misses == 0 and table.read(keys[-1]).accepted == 1
    finally:
        table.close()


def test_a_full_table_counts_misses_and_warns_once_a_minute(caplog, monkeypatch):
    from amproxy import devices
    monkeypatch.setattr(devices, "MIN_SLOTS", 1024)
    table = DeviceTable(0)
    try:
        assert table.capacity == 1024
        keys = [b"dev%d" % i for i in range(1100)]
        with caplog.at_level("WARNING", logger="amproxy.devices"):
            table.record(0, T0, {k: 1 for k in keys}, {}, {})
            misses = table.full_misses
            assert misses >= 1100 - 1024
            table.record(0, T0 + 30, {k: 1 for k in keys}, {}, {})
            assert table.full_misses == 2 * misses
            warnings = [r for r in caplog.records if "device table is full" in r.getMessage()]
            assert len(warnings) == 1
            table.record(0, T0 + 61, {keys[-1]: 1, keys[-2]: 1}, {}, {})
            warnings = [r for r in caplog.records if "device table is full" in r.getMessage()]
            assert len(warnings) == 2
        tracked = sum(table.read(k) is not None for k in keys)
        assert tracked == 1100 - misses
        # What a query says of a key without a slot: not tracked, not "never seen".
        assert [k for k in keys if not table.tracked(k)] == \
            [k for k in keys if table.read(k) is None]
    finally:
        table.close()


def test_recording_10_000_keys_is_quick():
    table = DeviceTable(20_000)
    try:
        keys = [b"device-%d" % i for i in range(10_000)]
        accepted = {k: 3 for k in keys}
        connected = {k: ("198.51.100.%d" % (i % 250), i % 2 == 0) for i, k in enumerate(keys)}
        table.record(0, T0, accepted, {}, connected)  # claims the slots
        started = time.perf_counter()
        table.record(0, T0 + 1, accepted, {}, connected)
        assert time.perf_counter() - started < 0.5
        assert table.read(keys[0]).accepted == 6
    finally:
        table.close()


def test_the_newest_source_wins_whatever_worker_records_first(table):
    """A device's connection from A closed on worker 0, its next one from B a moment
    later on worker 1: worker 1 may record first; B stays."""
    now = table.created + 10
    table.record(1, now, {}, {}, {}, {b"dev": ("203.0.113.9", False, now - 0.2)})
    table.record(0, now + 0.5, {}, {}, {}, {b"dev": ("198.51.100.4", False, now - 0.3)})
    assert table.read(b"dev").address == "203.0.113.9"


def test_the_counts_of_key_maps_two_reloads_replaced_are_kept():
    """A worker's key objects count accepted lines; two reloads within a second replace
    two maps, and what each counted still reaches the table (and --stats-per-key)."""
    import types
    from amproxy.auth import AuthKey, KeyMap
    from amproxy.outcomes import DeviceTally
    recorded = []

    class Table:
        def record(self, worker, now, accepted, rejected, connected, came_from):
            recorded.append(dict(accepted))

    tally = DeviceTally(Table(), 0)
    maps = [KeyMap({b"dev": AuthKey("dev", "s", ["m"])}) for _ in range(3)]
    for count, keys in zip((1, 3, 2), maps):
        keys[b"dev"].accepted += count
    tally.keep_counts(maps[0])
    tally.keep_counts(maps[1])
    stats = types.SimpleNamespace(forwarded_per_key={})
    tally.record(types.SimpleNamespace(connections={}, departed={}), stats, maps[2])
    assert recorded == [{b"dev": 6}] and stats.forwarded_per_key == {b"dev": 6}


def test_states_reads_every_key_once_and_filters_before_building(table):
    table.record(0, T0, {b"fine": 1, b"quiet": 1}, {}, {})
    table.record(0, T0 + 100, {b"fine": 1}, {b"stuck": tally((SKEW, T0 + 100, 9))}, {})
    keys = [b"fine", b"quiet", b"stuck", b"never"]

    def states(**filters):
        return {k: (s and (s.key, s.accepted, s.rejected_since))
                for k, s in table.states(keys, **filters)}

    assert states() == {b"fine": ("fine", 2, None), b"quiet": ("quiet", 1, None),
                        b"stuck": ("stuck", 0, T0 + 100), b"never": None}
    # Nothing accepted after T0 + 50: the quiet, the stuck, the never seen.
    assert set(states(accepted_before=T0 + 50)) == {b"quiet", b"stuck", b"never"}
    assert set(states(accepted_before=T0)) == {b"quiet", b"stuck", b"never"}  # at T0: in
    assert set(states(rejected_only=True)) == {b"stuck"}
    assert states(accepted_before=T0 + 200, rejected_only=True) == {
        b"stuck": ("stuck", 0, T0 + 100)}
    assert dict(table.states([b"fine", b"fine"])).keys() == {b"fine"}


def test_a_forgotten_key_reads_as_never_seen(table):
    table.record(0, T0, {b"kept": 1, b"revoked": 1}, {}, {})
    table.forget_except([b"kept"])
    assert dict(table.states([b"kept", b"revoked"]))[b"revoked"] is None
    assert table.read(b"kept").accepted == 1


def test_a_key_forgotten_and_its_slot_claimed_while_a_query_reads_is_not_mixed_up(
        table, monkeypatch):
    """A query reads a column at a time, then a slot's counts and address: a reload
    that forgets the key and a worker that claims its slot for another key in between
    must not lend the new key's values to the old one."""
    table.record(0, T0, {}, {b"old": tally((SKEW, T0, 5))}, {b"old": ("192.0.2.1", False)})
    read_counts = table._counts

    def claimed_meanwhile(slot):
        counts = read_counts(slot)
        table.forget_except([])
        table._q[slot * (SLOT_SIZE // 8)] = 12345  # another key's hash, as a claim writes
        return counts
    monkeypatch.setattr(table, "_counts", claimed_meanwhile)
    assert dict(table.states([b"old"])) == {b"old": None}  # forgotten: never seen
