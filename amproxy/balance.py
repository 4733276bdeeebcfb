"""Spread client connections evenly over the workers.

The kernel gives a new connection to whichever worker is first to accept it,
so four busy connections can land three on one worker and one on the other:
the first worker is then the bottleneck while the second idles.  Each worker
publishes how many clients it holds in a table that the master shares with
all of them (one integer per worker slot, in anonymous shared memory, so
reading it costs no system call), and only the workers that hold no more than
the fewest, plus a slack, watch the listening socket (see listeners.Acceptor).
"""

import mmap

NOT_ACCEPTING = -1  # a slot with no worker, or one paused, stopping or booting
# Slots beyond this many are not balanced: such workers always accept.
CAPACITY = 1024


class ConnectionTable:
    """Created by the master before it forks; every worker writes only its own slot."""

    def __init__(self, capacity=CAPACITY):
        self._memory = mmap.mmap(-1, (capacity + 1) * 4)
        self._table = memoryview(self._memory).cast("i")
        self.capacity = capacity
        # Entry 0 holds how many slots are in use, so a reader looks at no more.
        self._table[0] = 0
        for slot in range(capacity):
            self._table[slot + 1] = NOT_ACCEPTING

    def publish(self, slot, connections):
        """Record a worker's client count, or NOT_ACCEPTING."""
        if slot < self.capacity:
            self._table[slot + 1] = connections
            if slot >= self._table[0]:
                self._table[0] = slot + 1

    def workers(self):
        """How many workers are accepting (at least 1)."""
        return max(1, sum(1 for c in self._table[1:self._table[0] + 1] if c >= 0))

    def allowance(self, slot, connections):
        """How many more clients a worker holding ``connections`` may take now: up to the
        least loaded worker's count plus a slack of 1 + 1/8 of it.  At small counts
        that is strict least-connections (four busy clients split two and two); at a
        storm's counts every worker takes batches instead of one client in turn."""
        if slot >= self.capacity:
            return 1 << 30
        counts = [c for c in self._table[1:self._table[0] + 1] if c >= 0]
        least = min(counts) if counts else connections
        return least + 1 + least // 8 - connections
