"""Logging: logfmt or JSON lines, the original's level names, reopenable files."""

import logging
import os
import sys
import time

try:  # python-json-logger 3.1 and newer
    from pythonjsonlogger.json import JsonFormatter
except ImportError:  # pragma: no cover - older python-json-logger
    from pythonjsonlogger.jsonlogger import JsonFormatter

from .protocol import UNKNOWN_KEY

LEVELS = {"all": 1, "debug": logging.DEBUG, "info": logging.INFO,
          "warn": logging.WARNING, "err": logging.ERROR}
_LEVEL_NAMES = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warn",
                logging.ERROR: "err", logging.CRITICAL: "crit"}

# Attributes every LogRecord has; anything else came from ``extra=``.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", "taskName"}

# Fields are cut to this length, so a flood of junk cannot fill the disk; a
# traceback is the exception: it is logged once per crash and needed whole.
MAX_FIELD_LENGTH = 200
LOG_FILE_MODE = 0o640  # a new log file: the daemon's group (adm, say) may read it


def _timestamp(record):
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + (
        ".%03dZ" % record.msecs)


def _extra_fields(record):
    return [(k, v) for k, v in record.__dict__.items() if k not in _STANDARD_ATTRS]


def _logfmt_value(value, max_length=MAX_FIELD_LENGTH):
    if isinstance(value, bytes):
        value = value.decode("utf-8", "backslashreplace")
    text = str(value)
    if max_length is not None and len(text) > max_length:
        text = text[:max_length] + "..."
    if text and not any(c in text for c in ' ="\\') and text.isprintable():
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    escaped = "".join(c if c.isprintable() else repr(c)[1:-1] for c in escaped)
    return '"%s"' % escaped


class LogfmtFormatter(logging.Formatter):
    """``ts=... level=info pid=123 msg="..." key=value`` on one line.

    A traceback comes last, as ``error="..."``, whole, its newlines escaped.
    """

    def format(self, record):
        parts = [("ts", _timestamp(record)),
                 ("level", _LEVEL_NAMES.get(record.levelno, record.levelname.lower())),
                 ("pid", record.process),
                 ("msg", record.getMessage())]
        parts.extend(_extra_fields(record))
        line = " ".join("%s=%s" % (k, _logfmt_value(v)) for k, v in parts)
        if record.exc_info:
            line += " error=" + _logfmt_value(self.formatException(record.exc_info),
                                             max_length=None)
        return line


# The formatted traceback and stack in a JSON line: never cut.
_JSON_TRACEBACK_FIELDS = frozenset({"exc_info", "stack_info"})


class JsonLineFormatter(JsonFormatter):
    def add_fields(self, log_record, record, message_dict):
        super().add_fields(log_record, record, message_dict)
        log_record["ts"] = _timestamp(record)
        log_record["level"] = _LEVEL_NAMES.get(record.levelno, record.levelname.lower())
        log_record["pid"] = record.process
        for key, value in list(log_record.items()):
            if isinstance(value, bytes):
                value = value.decode("utf-8", "backslashreplace")
            if isinstance(value, str) and len(value) > MAX_FIELD_LENGTH and \
                    key not in _JSON_TRACEBACK_FIELDS:
                value = value[:MAX_FIELD_LENGTH] + "..."
            log_record[key] = value


class ReopenableFileHandler(logging.StreamHandler):
    """A log file that ``reopen()`` opens again by name, after logrotate moved it.

    A file that does not exist is created with mode 0640 (less any umask bits);
    one that exists keeps its mode.
    """

    def __init__(self, path):
        self.path = path
        super().__init__(self._open())

    def _open(self):
        # os.open takes the mode for a new file, so the process umask (which
        # also applies to the spool and pidfile) stays as it is.
        # O_NOFOLLOW: root opens it in a directory the daemon user may own.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW,
                     LOG_FILE_MODE)
        return open(fd, "a", encoding="utf-8", buffering=1)

    def reopen(self):
        """Open the file again by name; if that fails, keep writing to the old one."""
        self.acquire()
        try:
            try:
                new = self._open()
            except OSError as e:
                self.stream.write("cannot reopen log file %s: %s; still writing to the "
                                  "file that was open\n" % (self.path, e.strerror or e))
                return
            old, self.stream = self.stream, new
            old.close()
        finally:
            self.release()

    def close(self):
        self.acquire()
        try:
            if self.stream:
                self.stream.close()
        finally:
            self.release()
        super().close()


def setup_logging(log_format="logfmt", level="info", log_file=None):
    """Configure the root logger; return its handler."""
    if log_file:
        handler = ReopenableFileHandler(log_file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonLineFormatter("%(message)s", rename_fields={
            "message": "msg"}))
    else:
        handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    set_level(level)
    return handler


def set_level(level):
    logging.getLogger().setLevel(LEVELS[level])


def chown_log_files(uid):
    """Before dropping privileges: the log files root opened become the daemon user's."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, ReopenableFileHandler) and uid != -1:
            os.fchown(handler.stream.fileno(), uid, -1)


def reopen_log_files():
    for handler in logging.getLogger().handlers:
        if isinstance(handler, ReopenableFileHandler):
            handler.reopen()


UNKNOWN_KEY_PREFIX = 4  # characters, at most, of an unknown key in the rejection log


class RejectionLog:
    """Logs rejected lines, at most ``per_second`` per reason per second.

    The caller counts every rejection in ``counts`` (reason -> total) and logs
    one only while ``budget[reason]`` is not used up: two dict operations per
    rejected line, so a flood of bad lines costs less than good ones.  Each
    second ``tick`` refills the budget and logs, per reason, how many lines
    were left out, so a flood cannot fill the disk but is never hidden.
    """

    def __init__(self, logger, per_second, counts):
        self.logger = logger
        self.per_second = per_second
        self.counts = counts
        self.budget = dict.fromkeys(counts, per_second)
        self._counts_at_start = dict(counts)
        self._second = None

    def log(self, reason, remote, public_key, metric):
        """Log one rejected line.

        A key that is not in the auth file may be a secret key sent in its
        place (a device with its keys swapped), so for ``unknownKey`` only
        its start is logged, and its length in bytes:
        ``public_key=Zm9v... public_key_length=44``.  The start is at most
        4 characters and a quarter of the key.  Known keys are logged whole.
        """
        fields = {"reason": reason, "remote": remote}
        if reason == UNKNOWN_KEY and public_key is not None:
            prefix = public_key[:min(UNKNOWN_KEY_PREFIX, len(public_key) // 4)]
            if isinstance(prefix, bytes):
                prefix = prefix.decode("utf-8", "backslashreplace")
            fields["public_key"] = prefix + "..."
            fields["public_key_length"] = len(public_key)
        elif public_key is not None:
            fields["public_key"] = public_key
        if metric is not None:
            fields["metric"] = metric
        self.logger.warning("line rejected", extra=fields)

    def tick(self, now):
        """Call at least once a second: reports what was left out, refills the budget."""
        if now == self._second:
            return
        self.flush()
        self._second = now

    def flush(self):
        for reason, count in self.counts.items():
            logged = self.per_second - self.budget[reason]
            suppressed = count - self._counts_at_start[reason] - logged
            if suppressed > 0:
                self.logger.warning("rejection log lines suppressed", extra={
                    "reason": reason, "suppressed": suppressed,
                    "limit_per_second": self.per_second})
        self.budget = dict.fromkeys(self.counts, self.per_second)
        self._counts_at_start = dict(self.counts)


class ClosedConnectionLog:
    """Counts client connections closed for one kind of fault; logs at most one a second.

    A scan or a misconfigured balancer can open thousands of bad connections:
    each is counted, but the log says so once a second, not thousands of times.
    """

    def __init__(self, logger, clock, note=""):
        self.logger = logger
        self.clock = clock
        self.note = note  # appended to each message, such as the option that applies
        self.count = 0
        self._logged_at = None
        self._unlogged = 0  # since the last line logged

    def error(self, conn, why):
        """Count and (within the budget) log why ``conn`` is closed."""
        self.count += 1
        now = self.clock()
        if self._logged_at is None or now - self._logged_at >= 1:
            self._logged_at = now
            extra = {"remote": conn.remote}
            if self._unlogged:
                extra["not_logged_before"] = self._unlogged
            self._unlogged = 0
            self.logger.warning("closing client connection: %s%s", why, self.note, extra=extra)
        else:
            self._unlogged += 1
