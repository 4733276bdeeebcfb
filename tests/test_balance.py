"""The table through which workers share out client connections."""
import os

from amproxy.balance import NOT_ACCEPTING, ConnectionTable


def test_only_the_least_loaded_workers_take_the_next_connection():
    table = ConnectionTable(capacity=4)
    assert table.is_least_loaded(0, 0)  # alone, before anyone published
    table.publish(0, 3)
    table.publish(1, 2)
    table.publish(2, 2)
    assert not table.is_least_loaded(0, 3)
    assert table.is_least_loaded(1, 2) and table.is_least_loaded(2, 2)


def test_paused_stopping_or_dead_workers_do_not_count():
    table = ConnectionTable(capacity=4)
    table.publish(0, 5)
    table.publish(1, 0)
    assert not table.is_least_loaded(0, 5)
    table.publish(1, NOT_ACCEPTING)
    assert table.is_least_loaded(0, 5)


def test_workers_beyond_the_capacity_always_accept():
    table = ConnectionTable(capacity=2)
    table.publish(0, 0)
    table.publish(5, 9)  # ignored
    assert table.is_least_loaded(5, 9) and table.is_least_loaded(0, 0)


def test_the_table_is_shared_with_forked_workers():
    table = ConnectionTable(capacity=4)
    table.publish(0, 4)
    pid = os.fork()
    if pid == 0:
        table.publish(1, 1)
        os._exit(0)
    os.waitpid(pid, 0)
    assert not table.is_least_loaded(0, 4) and table.is_least_loaded(1, 1)
