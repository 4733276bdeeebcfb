import io
import json
import logging

from amproxy.logs import JsonLineFormatter, LogfmtFormatter, RejectionLog


def record(msg, level=logging.INFO, **extra):
    logger = logging.getLogger("t")
    return logger.makeRecord("t", level, __file__, 1, msg, (), None, extra=extra)


def test_logfmt_quotes_and_escapes():
    line = LogfmtFormatter().format(record("line rejected", level=logging.WARNING,
                                           remote="1.2.3.4:5", metric=b'a "b"\x00',
                                           count=3))
    assert line.startswith("ts=")
    assert " level=warn " in line
    assert ' msg="line rejected" ' in line
    assert " remote=1.2.3.4:5" in line
    assert r' metric="a \"b\"\x00"' in line
    assert " count=3" in line
    assert "\n" not in line


def test_logfmt_cuts_long_fields():
    line = LogfmtFormatter().format(record("x", metric="m" * 5000))
    assert len(line) < 400


def test_json_lines():
    fmt = JsonLineFormatter("%(message)s", rename_fields={"message": "msg"})
    data = json.loads(fmt.format(record("hello", public_key=b"k\xff", n=1)))
    assert data["msg"] == "hello"
    assert data["level"] == "info"
    assert data["public_key"] == "k\\xff"
    assert data["n"] == 1


def make_logger():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(LogfmtFormatter())
    logger = logging.getLogger("rejections-test")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger, stream


def reject_many(rejections, reason, count):
    """What the worker's callback does for each rejected line."""
    for _ in range(count):
        rejections.counts[reason] += 1
        if rejections.budget[reason]:
            rejections.budget[reason] -= 1
            rejections.log(reason, "r", b"k", b"m")


def test_rejection_log_is_rate_limited_per_reason_and_reports_suppressed():
    logger, stream = make_logger()
    rejections = RejectionLog(logger, 3, {"badSignature": 0, "skew": 0})
    rejections.tick(100)
    reject_many(rejections, "badSignature", 1000)
    reject_many(rejections, "skew", 2)
    assert stream.getvalue().count("line rejected") == 5
    rejections.tick(100)  # same second: nothing yet
    assert "suppressed" not in stream.getvalue()
    rejections.tick(101)
    text = stream.getvalue()
    assert "suppressed=997" in text and "reason=badSignature" in text
    assert "reason=skew suppressed" not in text
    reject_many(rejections, "skew", 4)  # a new second, a new budget
    assert stream.getvalue().count("line rejected") == 8


def test_rejection_log_zero_logs_nothing_but_counts():
    logger, stream = make_logger()
    rejections = RejectionLog(logger, 0, {"skew": 0})
    reject_many(rejections, "skew", 10)
    rejections.flush()
    assert "line rejected" not in stream.getvalue()
    assert "suppressed=10" in stream.getvalue()
