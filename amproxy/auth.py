"""The auth file: read and validate it into a lookup of keys.

The running server holds it as a snapshot (:mod:`amproxy.authsnapshot`),
built from the standard layout in place (:mod:`amproxy.authscan`); the full
parse here reads the files in any other layout: a simple layout without the
YAML library (:func:`parse_simple_layout`), anything else with it.

Every scalar is read as the string written in the file (YAML's "base"
schema): ``secret_key: 0123`` is the secret "0123", ``yes`` is "yes".
"""

import datetime
import logging
import os
import re
import stat

import yaml

from .errors import AuthFileError
from .patterns import GLOB_CHARS, PatternError, compile_patterns
from .protocol import Signer, metric_problem

log = logging.getLogger(__name__)

_YAML_LOADER = getattr(yaml, "CBaseLoader", yaml.BaseLoader)
_WHITESPACE = re.compile(r"\s")


# Per key: enough for every series of a busy device, bounded (to about 128 KB)
# against one that makes up a new long name for every line.
MAX_REMEMBERED_MATCHES = 1000
MAX_REMEMBERED_BYTES = 128


def _never(metric):
    return False


class AuthKey(Signer):
    """One device key: how to check its signatures and which metrics it may write.

    ``metrics`` holds the exact names (a set lookup per line);
    ``allows_pattern`` matches the glob patterns, compiled once per load.
    The HMAC states and the exact set are built on first use: an auth file
    of 100,000 keys loads in a fraction of the time, and keys that never send
    cost little memory.
    """

    __slots__ = ("name", "metrics", "allows_pattern", "patterns", "matched", "_secret",
                 "_metric_names", "previous", "previous_until", "_previous_secret",
                 "max_rate")

    def __init__(self, name, secret, metric_names, patterns=(), matcher=None,
                 previous_secret=None, previous_until=0, max_rate=0.0):
        self.name = name
        self.max_rate = max_rate  # lines per second; 0: --key-max-rate applies
        self._secret = secret
        self._metric_names = metric_names
        self.patterns = patterns
        self.allows_pattern = matcher or _never
        # Key rotation: the secret before this one also signs, until then (Unix time;
        # 0: no previous secret).  Checked only when the current secret fails.
        self._previous_secret = previous_secret
        self.previous_until = previous_until

    def __getattr__(self, attribute):
        # Only called for a slot not yet set: build it now.
        if attribute in ("inner", "outer"):
            Signer.__init__(self, self._secret)
        elif attribute == "previous":
            self.previous = Signer(self._previous_secret) if self._previous_secret else None
        elif attribute == "matched":
            self.matched = set()
        elif attribute == "metrics":
            # A name that no line could pass (see protocol.metric_problem) is
            # left out, so that the exact lookup alone proves a name valid.
            self.metrics = frozenset(
                name for name in (m.encode("utf-8") for m in self._metric_names)
                if metric_problem(name) is None)
        else:
            raise AttributeError(attribute)
        return object.__getattribute__(self, attribute)

    def allows(self, metric):
        return metric in self.metrics or self.allows_pattern(metric)

    def remember_match(self, metric):
        """Remember a metric that passed the name checks and a pattern.

        Devices send the same names again and again: the next line with this
        one costs a set lookup instead of the checks and the pattern.  Tagged
        names are not kept, since --allow-tags can be turned off live, nor
        long ones, so that the memory stays bounded.
        """
        if len(metric) > MAX_REMEMBERED_BYTES or b";" in metric:
            return
        if len(self.matched) >= MAX_REMEMBERED_MATCHES:
            self.matched.clear()
        self.matched.add(metric)


class KeyMap(dict):
    """Public key (bytes) -> :class:`AuthKey`; an unknown key gives None.

    The hot path looks keys up with ``keys[public_key]``, which a subclass
    may answer by building the key on first use (``__missing__``).
    """

    __slots__ = ()

    def __missing__(self, public_key):
        return None


class AuthDB:
    """Public key (bytes) -> :class:`AuthKey`, as read from one version of the file."""

    def __init__(self, keys):
        self.keys = KeyMap((k.name.encode("utf-8"), k) for k in keys)
        self.rate_limited = any(k.max_rate for k in self.keys.values())

    def __len__(self):
        return len(self.keys)

    def get(self, public_key, default=None):
        return self.keys.get(public_key, default)

    @property
    def metric_count(self):
        return sum(len(k._metric_names) for k in self.keys.values())

    @property
    def pattern_count(self):
        return sum(len(k.patterns) for k in self.keys.values())


def _all_metric_names(metrics):
    """True if every item is a non-empty string without whitespace (checked in bulk)."""
    try:
        joined = "".join(metrics)
    except TypeError:
        return False
    return "" not in metrics and not _WHITESPACE.search(joined)


def _split_patterns(metrics, name, path, compiled):
    """Exact names and compiled patterns; ``compiled`` caches matchers across keys."""
    if not GLOB_CHARS.search("".join(metrics)):
        return tuple(metrics), (), None
    exact = tuple(m for m in metrics if not GLOB_CHARS.search(m))
    patterns = tuple(m for m in metrics if GLOB_CHARS.search(m))
    matcher = compiled.get(patterns)
    if matcher is None:
        try:
            matcher = compiled[patterns] = compile_patterns(patterns)
        except (PatternError, re.error) as e:
            raise AuthFileError("auth file %s: key %r: bad metric pattern: %s" % (
                path, name, e)) from None
    return exact, patterns, matcher


def parse_auth_data(data, path):
    """Validate the parsed document ``data`` and build an :class:`AuthDB`."""
    compiled = {}
    if not isinstance(data, dict) or not isinstance(data.get("apikeys"), dict):
        raise AuthFileError("auth file %s must contain a mapping named 'apikeys'" % path)
    keys = []
    for name, entry in data["apikeys"].items():
        if not isinstance(name, str) or not name or _WHITESPACE.search(name):
            raise AuthFileError("auth file %s: public key %r must be a non-empty string "
                                "without spaces" % (path, name))
        if not isinstance(entry, dict):
            raise AuthFileError("auth file %s: key %r must be a mapping with secret_key "
                                "and metrics" % (path, name))
        secret = entry.get("secret_key")
        if not secret or not isinstance(secret, str):
            raise AuthFileError("auth file %s: key %r has no secret_key" % (path, name))
        metrics = entry.get("metrics")
        if not isinstance(metrics, list):
            raise AuthFileError("auth file %s: key %r: metrics must be a list of metric "
                                "names" % (path, name))
        if not _all_metric_names(metrics):
            bad = next(m for m in metrics if not _all_metric_names([m]))
            raise AuthFileError("auth file %s: key %r: metric %r must be a non-empty "
                                "string without spaces" % (path, name, bad))
        keys.append(AuthKey(name, secret, *_split_patterns(metrics, name, path, compiled),
                            *_previous_secret(entry, name, path),
                            _max_rate(entry, name, path)))
    return AuthDB(keys)


def parse_rfc3339(text):
    """An RFC 3339 time (``2026-12-05T10:00:00Z``, with an offset) as Unix time; ValueError."""
    if not isinstance(text, str) or not _RFC3339.match(text):
        raise ValueError("%r is not an RFC 3339 time such as 2026-12-05T10:00:00Z" % (text,))
    return datetime.datetime.fromisoformat(
        text.replace("z", "Z").replace("Z", "+00:00").replace("t", "T")).timestamp()


def format_rfc3339(seconds):
    try:
        return datetime.datetime.fromtimestamp(int(seconds), datetime.timezone.utc).strftime(
            "%Y-%m-%dT%H:%M:%SZ")
    except (ValueError, OverflowError, OSError):  # past the year 9999 in UTC
        return "9999-12-31T23:59:59Z"


RFC3339_TEXT = r"\d{4}-\d\d-\d\d[Tt]\d\d:\d\d:\d\d(?:\.\d+)?(?:[Zz]|[+-]\d\d:\d\d)"
_RFC3339 = re.compile(RFC3339_TEXT + r"\Z")


def _max_rate(entry, name, path):
    text = entry.get("max_rate")
    if text is None:
        return 0.0
    try:
        rate = float(text)
    except (TypeError, ValueError):
        rate = -1.0
    if not 0 < rate < float("inf"):
        raise AuthFileError("auth file %s: key %r: max_rate %r is not a number of lines per "
                            "second above 0" % (path, name, text))
    return rate


def _previous_secret(entry, name, path):
    """(previous secret, until when) of a key in rotation; (None, 0) for the others."""
    previous = entry.get("previous_secret_key")
    expires = entry.get("previous_secret_expires")
    if previous is None and expires is None:
        return None, 0
    if not previous or not isinstance(previous, str) or expires is None:
        raise AuthFileError("auth file %s: key %r needs both previous_secret_key and "
                            "previous_secret_expires, or neither" % (path, name))
    try:
        return previous, parse_rfc3339(expires)
    except ValueError as e:
        raise AuthFileError("auth file %s: key %r: previous_secret_expires: %s" % (
            path, name, e)) from None


# A plain scalar that means the same string in every YAML schema: no quotes,
# no indicators, no spaces, no comment.
PLAIN_TEXT = r"[A-Za-z0-9_./][A-Za-z0-9_./+=@~^%*?-]*"
_PLAIN = re.compile(PLAIN_TEXT + r"\Z")
_PLAIN_LINES = re.compile(r"(?:%s\n)*\Z" % PLAIN_TEXT)


_SIMPLE_FIELDS = ("secret_key", "metrics", "previous_secret_key", "previous_secret_expires",
                  "max_rate")


def parse_simple_layout(text):
    """Parse the auth file's usual layout fast, without the YAML library.

    Handles exactly: an optional ``---``, ``apikeys:``, one indented
    ``NAME:`` per key, and under it ``secret_key: VALUE`` and ``metrics:``
    followed by ``- NAME`` items (or ``metrics: []``), with comment lines and
    blank lines anywhere.  Returns what YAML would, or None for anything else
    (quotes, flow style, anchors, trailing comments, odd indentation...),
    which then goes to the YAML parser.  PyYAML needs about 14 s for 100,000
    keys of 10 metrics; this needs a tenth of that.
    """
    keys = {}
    lines = iter(text.splitlines())
    for line in lines:
        if line.strip() and not line.lstrip().startswith("#") and line != "---":
            break
    else:
        return None
    if line.rstrip() != "apikeys:":
        return None
    key_indent = field_indent = None
    entry = metrics = None
    item_prefix = None  # the usual "    - " before a metric, set by the first one
    for line in lines:
        if metrics is not None and item_prefix and line.startswith(item_prefix):
            metrics.append(line[len(item_prefix):])  # checked all at once below
            continue
        content = line.lstrip(" ")
        if not content or content[0] == "#":
            continue
        indent = len(line) - len(content)
        content = content.rstrip(" ")
        if "\t" in line or indent == 0:
            return None
        if content[:2] == "- ":
            if metrics is None or indent < field_indent:
                return None
            metrics.append(content[2:])
            item_prefix = item_prefix or line[:indent + 2]
            continue
        name, colon, value = content.partition(":")
        if not colon or not _PLAIN.match(name):
            return None
        if key_indent is None:
            key_indent = indent
        if indent == key_indent:
            if value or name in keys:
                return None
            entry = keys[name] = {}
            field_indent = metrics = None
            continue
        if entry is None or indent <= key_indent:
            return None
        if field_indent is None:
            field_indent = indent
        if indent != field_indent or name in entry or name not in _SIMPLE_FIELDS:
            return None
        value = value.lstrip(" ")
        metrics = None
        if name == "metrics":
            if value == "[]":
                entry[name] = []
            elif value:
                return None
            else:
                metrics = entry[name] = []
        elif not (_PLAIN.match(value) or (name == "previous_secret_expires"
                                            and _RFC3339.match(value))):
            return None
        else:
            entry[name] = value
    for entry in keys.values():
        names = entry.get("metrics")
        if names and not _PLAIN_LINES.match("\n".join(names) + "\n"):
            return None
    return {"apikeys": keys}


def load_auth_file(path):
    """Read, parse and validate the auth file at ``path``; raise AuthFileError."""
    return parse_auth_file(read_auth_file(path), path)


def read_auth_file(path):
    try:
        # Not blocking: a FIFO put in its place must not hang the reader.
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise AuthFileError("auth file %s is not a regular file" % path)
            return f.read()
    except OSError as e:
        raise AuthFileError("cannot read auth file %s: %s" % (path, e.strerror or e)) from None


def parse_auth_file(raw, path):
    """Parse and validate an auth file's bytes (read from ``path``) into an :class:`AuthDB`."""
    try:
        data = parse_auth_text(raw)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = " at line %d" % (where.line + 1) if where is not None else ""
        raise AuthFileError("auth file %s is not valid YAML%s" % (path, line)) from None
    return parse_auth_data(data, path)


def parse_auth_text(raw):
    """The document in an auth file (bytes or str), not yet validated.

    The usual layout goes through the fast parser, anything else through
    PyYAML, both reading every scalar as the string written.  Raises
    yaml.YAMLError.
    """
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError:
        text = None
    data = parse_simple_layout(text) if text is not None else None
    if data is None:
        data = yaml.load(raw, Loader=_YAML_LOADER)
    return data


def warn_if_world_readable(path):
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if mode & stat.S_IROTH:
        log.warning("auth file %s can be read by every user; it holds secret keys, "
                    "so chmod o-r it", path, extra={"file": path})
