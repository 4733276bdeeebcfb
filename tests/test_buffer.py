from amproxy.buffer import LineBuffer


def test_fifo_with_partial_sends():
    buf = LineBuffer(10)
    assert buf.append(b"a 1 1\nb 2 2\n", 2)
    assert buf.append(b"c 3 3\n", 1)
    assert len(buf) == 3 and buf.room() == 7
    assert bytes(buf.head()) == b"a 1 1\nb 2 2\n"
    buf.consume(4)
    assert bytes(buf.head()) == b"1\nb 2 2\n"
    assert len(buf) == 3  # a chunk leaves the count once it is fully sent
    buf.consume(8 + 4)
    assert bytes(buf.head()) == b"3\n"
    assert len(buf) == 1
    buf.consume(2)
    assert not buf and len(buf) == 0


def test_bounded_in_lines():
    buf = LineBuffer(3)
    assert buf.append(b"x\ny\n", 2)
    assert not buf.append(b"z\nw\n", 2)
    assert len(buf) == 2
    assert buf.append(b"z\n", 1)
    assert buf.room() == 0


def test_pop_all_keeps_order_and_skips_sent_bytes():
    buf = LineBuffer(10)
    buf.append(b"aa\nbb\n", 2)
    buf.append(b"cc\n", 1)
    buf.consume(3)
    assert buf.pop_all() == (b"bb\ncc\n", 3)
    assert not buf and buf.pop_all() == (b"", 0)
