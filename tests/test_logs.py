import io
import json
import logging
import os
import sys

import pytest

from amproxy.logs import (MAX_FIELD_LENGTH, JsonLineFormatter, LogfmtFormatter, RejectionLog,
                          ReopenableFileHandler)


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


def crash_record(**extra):
    """A record of a crash whose traceback is well over MAX_FIELD_LENGTH."""
    def deep(n):
        if n:
            deep(n - 1)
        raise ValueError("the last line of the traceback " + "x" * 300)
    try:
        deep(10)
    except ValueError:
        exc_info = sys.exc_info()
    return logging.getLogger("t").makeRecord("t", logging.ERROR, __file__, 1, "worker crashed",
                                             (), exc_info, extra=extra)


def test_logfmt_keeps_the_whole_traceback_on_one_line():
    line = LogfmtFormatter().format(crash_record(metric="m" * 5000))
    assert "\n" not in line
    assert "Traceback (most recent call last)" in line
    assert "ValueError: the last line of the traceback " + "x" * 300 in line
    assert "m" * MAX_FIELD_LENGTH + "..." in line and "m" * (MAX_FIELD_LENGTH + 1) not in line


def test_json_keeps_the_whole_traceback():
    fmt = JsonLineFormatter("%(message)s", rename_fields={"message": "msg"})
    data = json.loads(fmt.format(crash_record(metric="m" * 5000)))
    assert data["exc_info"].startswith("Traceback (most recent call last)")
    assert data["exc_info"].endswith("ValueError: the last line of the traceback " + "x" * 300)
    assert data["metric"] == "m" * MAX_FIELD_LENGTH + "..."


def test_json_lines():
    fmt = JsonLineFormatter("%(message)s", rename_fields={"message": "msg"})
    data = json.loads(fmt.format(record("hello", public_key=b"k\xff", n=1)))
    assert data["msg"] == "hello"
    assert data["level"] == "info"
    assert data["public_key"] == "k\\xff"
    assert data["n"] == 1


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def file_mode(path):
    return os.stat(path).st_mode & 0o777


def test_log_file_is_created_0640_and_again_on_reopen(tmp_path, umask_022):
    path = tmp_path / "amproxy.log"
    handler = ReopenableFileHandler(str(path))
    try:
        assert file_mode(path) == 0o640
        os.rename(path, tmp_path / "amproxy.log.1")  # what logrotate does
        handler.reopen()
        assert file_mode(path) == 0o640
        handler.emit(logging.makeLogRecord({"msg": "after reopen"}))
        assert path.read_text() == "after reopen\n"
    finally:
        handler.close()


def test_existing_log_file_keeps_its_mode_and_content(tmp_path, umask_022):
    path = tmp_path / "amproxy.log"
    path.write_text("old line\n")
    os.chmod(path, 0o604)
    handler = ReopenableFileHandler(str(path))
    try:
        handler.emit(logging.makeLogRecord({"msg": "new line"}))
        assert file_mode(path) == 0o604
        assert path.read_text() == "old line\nnew line\n"
    finally:
        handler.close()


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


def test_unknown_key_is_logged_as_a_short_prefix_and_its_length():
    """A device that swapped its keys sends its secret as the public key."""
    logger, stream = make_logger()
    rejections = RejectionLog(logger, 3, {"unknownKey": 0, "badSignature": 0})
    secret = b"Zm9vYmFyYmF6cXV4c2VjcmV0a2V5MTIzNDU2Nzg5MA=="
    rejections.log("unknownKey", "1.2.3.4:5", secret, b"m")
    rejections.log("unknownKey", "1.2.3.4:5", b"s3cr3t", b"m")
    rejections.log("badSignature", "1.2.3.4:5", b"alpha", b"m")
    lines = stream.getvalue().splitlines()
    assert "Zm9vYmFy" not in lines[0]
    assert " public_key=Zm9v... public_key_length=44 " in lines[0]
    assert "s3cr" not in lines[1]
    assert " public_key=s... public_key_length=6 " in lines[1]
    assert " public_key=alpha " in lines[2] and "public_key_length" not in lines[2]


def test_a_log_file_that_cannot_be_reopened_keeps_the_old_one(tmp_path):
    """USR1 after logrotate must never take the server down."""
    from amproxy.logs import ReopenableFileHandler
    path = tmp_path / "amproxy.log"
    handler = ReopenableFileHandler(str(path))
    os.rename(path, tmp_path / "amproxy.log.1")
    os.mkdir(path)  # the name is now a directory: it cannot be opened as a file
    handler.reopen()
    handler.stream.write("still logging\n")
    handler.close()
    text = (tmp_path / "amproxy.log.1").read_text()
    assert "cannot reopen log file" in text and "still logging" in text
