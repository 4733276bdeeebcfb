"""The auth file: read and validate it into a lookup of keys.

The running server holds it as a snapshot (:mod:`amproxy.authsnapshot`),
built from the standard layout in place (:mod:`amproxy.authscan`, a strict
subset of YAML that means what YAML means); every other file is read here,
by PyYAML and nothing else, so that there is one grammar.

Every scalar is read as the string written in the file (YAML's "base"
schema): ``secret_key: 0123`` is the secret "0123", ``yes`` is "yes".  A key
given twice in one mapping is an error, as YAML 1.2 says, not "the last one
wins".  No message quotes the value of a secret field, or of a field where a
misplaced secret could be (``previous_secret_expires``, ``max_rate``).
"""

import datetime
import logging
import os
import re
import stat
import time

import yaml

from .errors import AuthFileError
from .patterns import GLOB_CHARS, PatternError, compile_patterns
from .protocol import CARBON_MAX_LINE_BYTES, Signer, metric_problem

log = logging.getLogger(__name__)

_YAML_LOADER = getattr(yaml, "CBaseLoader", yaml.BaseLoader)
_WHITESPACE = re.compile(r"\s")
# A file being rewritten in place is read again after a pause, this many times.
READ_ATTEMPTS = 10
READ_RETRY_SECONDS = 0.05


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
    Built ready for the hot path (its HMAC states, its exact set): the class has
    no ``__getattr__``, so CPython specializes the attribute reads of
    ``filter_lines`` (with one, each read took the generic path: 6% of its
    instructions).  :class:`LazyAuthKey` is for a file read whole.
    """

    __slots__ = ("name", "metrics", "allows_pattern", "patterns", "matched", "_secret",
                 "metric_names", "previous", "previous_until", "_previous_secret",
                 "max_rate", "accepted")

    def __init__(self, name, secret, metric_names, patterns=(), matcher=None,
                 previous_secret=None, previous_until=0, max_rate=0.0):
        self.name = name
        self.accepted = 0  # lines since the worker last gave them to the device table
        self.max_rate = max_rate  # lines per second; 0: --key-max-rate applies
        self._secret = secret
        self.metric_names = metric_names
        self.patterns = patterns
        self.allows_pattern = matcher or _never
        # Key rotation: the secret before this one also signs, until then (Unix time;
        # 0: no previous secret).  Checked only when the current secret fails.
        self._previous_secret = previous_secret
        self.previous_until = previous_until
        self._build()

    def _build(self):
        Signer.__init__(self, self._secret)
        self.previous = Signer(self._previous_secret) if self._previous_secret else None
        self.matched = set()
        self.metrics = self._exact_names()

    def _exact_names(self):
        # A name that no line could pass (see protocol.metric_problem) is left out,
        # so that the exact lookup alone proves a name valid.
        return frozenset(name for name in (m.encode("utf-8") for m in self.metric_names)
                         if metric_problem(name) is None)

    def entry(self):
        """What the auth file says of this key: (secret, its metrics, exact names then
        patterns, the previous secret or None, until when, max_rate or 0)."""
        return (self._secret, [*self.metric_names, *self.patterns], self._previous_secret,
                self.previous_until, self.max_rate)

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


class LazyAuthKey(AuthKey):
    """An :class:`AuthKey` whose HMAC states and exact set are built on first use: a
    file of 100,000 keys read whole (``keys``, ``auth-file check``) loads in a
    fraction of the time, and keys never checked cost little memory."""

    __slots__ = ()

    def _build(self):
        pass  # in __getattr__, when first read

    def __getattr__(self, attribute):
        # Only called for a slot not yet set: build it now.
        if attribute in ("inner", "outer"):
            Signer.__init__(self, self._secret)
        elif attribute == "previous":
            self.previous = Signer(self._previous_secret) if self._previous_secret else None
        elif attribute == "matched":
            self.matched = set()
        elif attribute == "metrics":
            self.metrics = self._exact_names()
        else:
            raise AttributeError(attribute)
        return object.__getattribute__(self, attribute)


class KeyMap(dict):
    """Public key (bytes) -> :class:`AuthKey`; an unknown key gives None.

    The hot path looks keys up with ``keys[public_key]``, which a subclass
    may answer by building the key on first use (``__missing__``).
    """

    __slots__ = ("last_accepted",)  # filter_lines' last accepted public key

    def __missing__(self, public_key):
        return None

    def take_counts(self):
        """{public key: lines accepted} since the last call, as the key objects counted
        them (filter_lines), which start again from 0."""
        counts = {}
        for public_key, key in self.items():
            if key is not None and key.accepted:
                counts[public_key] = key.accepted
                key.accepted = 0
        return counts


class AuthDB:
    """Public key (bytes) -> :class:`AuthKey`, as read from one version of the file."""

    def __init__(self, keys, warnings=()):
        self.keys = KeyMap((k.name.encode("utf-8"), k) for k in keys)
        self.warnings = list(warnings)  # about keys that share a secret
        self.rate_limited = any(k.max_rate for k in self.keys.values())
        self.rate_total = sum(k.max_rate for k in self.keys.values())

    def __len__(self):
        return len(self.keys)

    def get(self, public_key, default=None):
        return self.keys.get(public_key, default)

    @property
    def metric_count(self):
        return sum(len(k.metric_names) for k in self.keys.values())

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


def split_patterns(metrics, name, path, compiled):
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


# No name, pattern or secret may be longer than the longest line Carbon takes.
MAX_FIELD_BYTES = CARBON_MAX_LINE_BYTES
# What aliases (``*name``) may add: without them, what YAML reads is never
# longer than the file; a file that aliases make much larger is refused.
MAX_EXPANSION = 2
EXPANSION_SLACK = 4096
# Shared secrets are each a warning; a file full of them gets this many and a count.
MAX_SHARED_SECRET_WARNINGS = 10


def shown(text, limit=40):
    """``text`` quoted for a message, shortened: a name in a message, not a flood."""
    text = repr(text)
    return text if len(text) <= limit else text[:limit - 4] + "...%s" % text[0]


def parse_auth_data(data, path, file_size=None):
    """Validate the parsed document ``data`` and build an :class:`AuthDB`.

    ``file_size``: the size of the file it was read from, which aliases may
    not make more than :data:`MAX_EXPANSION` times larger.
    """
    if not isinstance(data, dict) or not isinstance(data.get("apikeys"), dict):
        raise AuthFileError("auth file %s must contain a mapping named 'apikeys'" % path)
    limit = None if file_size is None else MAX_EXPANSION * file_size + EXPANSION_SLACK
    compiled, keys, owners, size = {}, [], SecretOwners(), 0
    for name, entry in data["apikeys"].items():
        _check_name(name, entry, path)
        size += _expanded_size(name, entry)
        if limit is not None and size > limit:
            raise AuthFileError("auth file %s: its aliases (*name) make it more than %d times "
                                "its size; write the values out" % (path, MAX_EXPANSION))
        secret, metrics = _entry_fields(name, entry, path)
        key = LazyAuthKey(name, secret, *split_patterns(metrics, name, path, compiled),
                      *parse_previous_secret(entry, name, path), parse_max_rate(entry, name, path))
        owners.add(name, secret, key._previous_secret)
        keys.append(key)
    return AuthDB(keys, owners.warnings(path))


def _check_name(name, entry, path):
    if not isinstance(name, str) or not name or _WHITESPACE.search(name):
        raise AuthFileError("auth file %s: public key %s must be a non-empty string "
                            "without spaces" % (path, shown(name)))
    if len(name.encode("utf-8")) > MAX_FIELD_BYTES:
        raise AuthFileError("auth file %s: public key %s is longer than %d bytes" % (
            path, shown(name), MAX_FIELD_BYTES))
    if not isinstance(entry, dict):
        raise AuthFileError("auth file %s: key %r must be a mapping with secret_key "
                            "and metrics" % (path, name))


def _expanded_size(name, entry):
    """About the bytes of a key's entry once aliases are expanded, in UTF-8 (items
    count as one more each, for their line)."""
    size = _utf8_length(name)
    for value in entry.values():
        size += _utf8_length(value) if isinstance(value, str) else len(value)
        if isinstance(value, list):
            size += sum(_utf8_length(item) if isinstance(item, str) else len(item)
                        for item in value)
    return size


def _utf8_length(text):
    return len(text) if text.isascii() else len(text.encode("utf-8", "replace"))


def _entry_fields(name, entry, path):
    """The secret and the metrics of a key's entry, checked."""
    secret = entry.get("secret_key")
    if not secret or not isinstance(secret, str):
        raise AuthFileError("auth file %s: key %r has no secret_key" % (path, name))
    if len(secret.encode("utf-8")) > MAX_FIELD_BYTES:
        raise AuthFileError("auth file %s: key %r: secret_key is longer than %d bytes" % (
            path, name, MAX_FIELD_BYTES))
    metrics = entry.get("metrics")
    if not isinstance(metrics, list):
        raise AuthFileError("auth file %s: key %r: metrics must be a list of metric "
                            "names" % (path, name))
    if not _all_metric_names(metrics):
        bad = next(m for m in metrics if not _all_metric_names([m]))
        raise AuthFileError("auth file %s: key %r: metric %s must be a non-empty "
                            "string without spaces" % (path, name, shown(bad)))
    if metrics and max(map(len, metrics)) > MAX_FIELD_BYTES // 4:
        for metric in metrics:
            if len(metric.encode("utf-8")) > MAX_FIELD_BYTES:
                raise AuthFileError("auth file %s: key %r: metric %s is longer than %d "
                                    "bytes" % (path, name, shown(metric), MAX_FIELD_BYTES))
    return secret, metrics


class SecretOwners:
    """Which key signs with which secret (current or previous).  Two keys that share
    one are each other: the device that holds it can sign as either."""

    def __init__(self):
        self.owners = {}  # secret -> the first key that has it
        self.shared = []  # (first key, other key) pairs, in file order

    def add(self, name, *secrets):
        for secret in secrets:
            if secret:
                owner = self.owners.setdefault(secret, name)
                if owner != name:
                    self.shared.append((owner, name))

    def warnings(self, path):
        def name(key):  # bytes, from the standard layout's scan
            return shown(key.decode("utf-8", "replace") if isinstance(key, bytes) else key)
        warnings = ["auth file %s: keys %s and %s share a secret (current or previous): the "
                    "device that holds it can sign as either; give each key its own "
                    "(amproxy keys rotate)" % (path, name(a), name(b))
                    for a, b in self.shared[:MAX_SHARED_SECRET_WARNINGS]]
        if len(self.shared) > MAX_SHARED_SECRET_WARNINGS:
            warnings.append("auth file %s: %d more pairs of keys share a secret" % (
                path, len(self.shared) - MAX_SHARED_SECRET_WARNINGS))
        return warnings


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


def parse_max_rate(entry, name, path):
    text = entry.get("max_rate")
    if text is None:
        return 0.0
    try:
        rate = float(text)
    except (TypeError, ValueError):
        rate = -1.0
    if not 0 < rate < float("inf"):  # its value unsaid: a secret put in the wrong place?
        raise AuthFileError("auth file %s: key %r: max_rate is not a number of lines per "
                            "second above 0" % (path, name))
    return rate


def parse_previous_secret(entry, name, path):
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
    except ValueError:  # its value unsaid: the two fields swapped would show the secret
        raise AuthFileError("auth file %s: key %r: previous_secret_expires is not an RFC 3339 "
                            "time such as 2026-12-05T10:00:00Z" % (path, name)) from None


def load_auth_file(path):
    """Read, parse and validate the auth file at ``path``; raise AuthFileError."""
    return parse_auth_file(read_auth_file(path), path)


def read_auth_file(path):
    """The file's bytes, read whole: a file that changes while it is read (being
    rewritten in place) is read again, and refused if it does not hold still."""
    for attempt in range(READ_ATTEMPTS):
        if attempt:
            time.sleep(READ_RETRY_SECONDS)  # let the writer finish
        try:
            # Not blocking: a FIFO put in its place must not hang the reader.
            with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as f:
                before = os.fstat(f.fileno())
                if not stat.S_ISREG(before.st_mode):
                    raise AuthFileError("auth file %s is not a regular file" % path)
                data = _read_all(f)
                after = os.fstat(f.fileno())
        except OSError as e:
            raise AuthFileError("cannot read auth file %s: %s" % (
                path, e.strerror or e)) from None
        if (before.st_mtime_ns, before.st_size) == (after.st_mtime_ns, len(data)):
            return data
    raise AuthFileError("auth file %s kept changing while it was read; not loaded until it "
                        "holds still" % path)


def _read_all(f):
    return f.read()


def parse_auth_file(raw, path):
    """Parse and validate an auth file's bytes (read from ``path``) into an :class:`AuthDB`."""
    try:
        data = parse_auth_text(raw)
    except DuplicateKeyError as e:
        raise AuthFileError("auth file %s: %s" % (path, e)) from None
    except yaml.YAMLError as e:  # its text may quote the file: the line only
        where = getattr(e, "problem_mark", None)
        line = " at line %d" % (where.line + 1) if where is not None else ""
        raise AuthFileError("auth file %s is not valid YAML%s" % (path, line)) from None
    except RecursionError:
        raise AuthFileError("auth file %s nests lists or mappings hundreds deep; an auth "
                            "file has three levels" % path) from None
    return parse_auth_data(data, path, len(raw))


class DuplicateKeyError(yaml.YAMLError):
    """A key given twice in one mapping: YAML 1.2 forbids it, and amproxy will not
    guess which one was meant (PyYAML would take the last)."""

    def __init__(self, key, first_line, line):
        super().__init__("%s is given twice in one mapping (lines %d and %d); remove one" % (
            shown(key), first_line, line))


class _AuthFileLoader(_YAML_LOADER):
    """YAML's base schema (every scalar a string), with duplicate keys refused."""

    def construct_mapping(self, node, deep=False):
        lines = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                line = key_node.start_mark.line + 1
                if key_node.value in lines:
                    raise DuplicateKeyError(key_node.value, lines[key_node.value], line)
                lines[key_node.value] = line
        return super().construct_mapping(node, deep=deep)


def parse_auth_text(raw):
    """The document in an auth file (bytes or str), not yet validated: PyYAML's
    reading, every scalar the string written.  Raises yaml.YAMLError."""
    return yaml.load(raw, Loader=_AuthFileLoader)


def warn_if_world_readable(path):
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if mode & stat.S_IROTH:
        log.warning("auth file %s can be read by every user; it holds secret keys, "
                    "so chmod o-r it", path, extra={"file": path})
