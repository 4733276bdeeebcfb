"""The table through which workers share out client connections."""
import os

from amproxy.balance import NOT_ACCEPTING, ConnectionTable


def test_only_the_least_loaded_workers_take_the_next_connection_at_small_counts():
    table = ConnectionTable(capacity=4)
    assert table.allowance(0, 0) == 1  # alone, before anyone published
    table.publish(0, 3)
    table.publish(1, 2)
    table.publish(2, 2)
    assert table.allowance(0, 3) == 0
    assert table.allowance(1, 2) == 1 and table.allowance(2, 2) == 1


def test_four_busy_connections_split_two_and_two():
    table = ConnectionTable(capacity=2)
    counts = [0, 0]
    table.publish(0, 0)
    table.publish(1, 0)
    for _ in range(4):
        # The first worker wins every race it is allowed to enter.
        taker = 0 if table.allowance(0, counts[0]) > 0 else 1
        assert table.allowance(taker, counts[taker]) > 0
        counts[taker] += 1
        table.publish(taker, counts[taker])
    assert counts == [2, 2]


def test_at_a_storms_counts_a_worker_takes_a_batch_at_a_time():
    table = ConnectionTable(capacity=2)
    table.publish(0, 800)
    table.publish(1, 800)
    # 1 + 1/8 of the least loaded's count: 101 more before the other must catch up.
    assert table.allowance(0, 800) == 101
    table.publish(0, 901)
    assert table.allowance(0, 901) == 0 and table.allowance(1, 800) == 101


def test_paused_stopping_or_dead_workers_do_not_count():
    table = ConnectionTable(capacity=4)
    table.publish(0, 5)
    table.publish(1, 0)
    assert table.allowance(0, 5) < 1
    table.publish(1, NOT_ACCEPTING)
    assert table.allowance(0, 5) == 1


def test_workers_beyond_the_capacity_always_accept():
    table = ConnectionTable(capacity=2)
    table.publish(0, 0)
    table.publish(5, 9)  # ignored
    assert table.allowance(5, 9) > 0 and table.allowance(0, 0) == 1


def test_the_table_is_shared_with_forked_workers():
    table = ConnectionTable(capacity=4)
    table.publish(0, 4)
    pid = os.fork()
    if pid == 0:
        table.publish(1, 1)
        os._exit(0)
    os.waitpid(pid, 0)
    assert table.allowance(0, 4) < 1 and table.allowance(1, 1) == 1
