"""The lines a worker has accepted but Carbon has not yet taken."""

import collections


class LineBuffer:
    """A FIFO of byte chunks, each holding whole Carbon lines, bounded in lines.

    Chunks are kept as they were batched (one per read cycle), so buffering
    costs no per-line work.  ``consume`` removes bytes from the front after a
    partial ``send``.
    """

    def __init__(self, max_lines):
        self.max_lines = max_lines
        self._chunks = collections.deque()  # [data, line_count]
        self._offset = 0  # bytes of the first chunk already sent
        self.lines = 0

    def __len__(self):
        return self.lines

    def __bool__(self):
        return bool(self._chunks)

    def room(self):
        return self.max_lines - self.lines

    def append(self, data, line_count):
        """Add a chunk; return False (and keep nothing) if it does not fit."""
        if line_count > self.max_lines - self.lines:
            return False
        self._chunks.append([data, line_count])
        self.lines += line_count
        return True

    def head(self):
        """The unsent bytes of the oldest chunk, as a memoryview."""
        return memoryview(self._chunks[0][0])[self._offset:]

    def consume(self, nbytes):
        """Drop ``nbytes`` sent bytes from the front; whole chunks only leave the count."""
        while nbytes:
            data, line_count = self._chunks[0]
            left = len(data) - self._offset
            if nbytes < left:
                self._offset += nbytes
                return
            nbytes -= left
            self._chunks.popleft()
            self._offset = 0
            self.lines -= line_count

    def pop_all(self):
        """Remove and return every unsent byte, oldest first, with the line count."""
        if not self._chunks:
            return b"", 0
        parts = [self.head()] + [c[0] for c in list(self._chunks)[1:]]
        data, lines = b"".join(parts), self.lines
        self._chunks.clear()
        self._offset = 0
        self.lines = 0
        return data, lines
