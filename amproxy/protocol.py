"""The wire protocol: split, sign and verify lines.

No I/O of its own: the hot loop (:func:`filter_lines`) reaches the rest of the
world only through what its caller hands it (the keys, the ``reject``
callback, the rate limiter and its shared memory).

A client sends ``metric value timestamp public_key signature``; the signature is
base64(HMAC-SHA256(secret, "metric value timestamp public_key")).  The signed
text is exactly the received bytes before the last space.
"""

import binascii
import hashlib
import hmac
import re
import unicodedata

# Rejection reasons.  The values are the names used in logs and self-metrics.
MALFORMED = "malformed"
UNKNOWN_KEY = "unknownKey"
BAD_SIGNATURE = "badSignature"
SKEW = "skew"
METRIC_NOT_ALLOWED = "metricNotAllowed"
BAD_VALUE = "badValue"
LINE_TOO_LONG = "lineTooLong"
BAD_METRIC = "badMetric"
RATE_LIMITED = "rateLimited"
REPLAYED = "replayed"

REJECTION_REASONS = (MALFORMED, UNKNOWN_KEY, BAD_SIGNATURE, SKEW, BAD_METRIC,
                     METRIC_NOT_ALLOWED, BAD_VALUE, LINE_TOO_LONG, RATE_LIMITED, REPLAYED)

# Bounds that keep every forwarded line far below carbon's 16,384-byte line
# limit (a longer line makes carbon-cache drop the connection) and every
# whisper path below Linux's PATH_MAX of 4,096 bytes.
CARBON_MAX_LINE_BYTES = 16384
MAX_METRIC_BYTES = 4000
MAX_NODE_BYTES = 255      # a file or directory name (NAME_MAX)
MAX_LAST_NODE_BYTES = 251  # carbon appends ".wsp" to the last node
MAX_VALUE_BYTES = 64
MAX_TIMESTAMP_BYTES = 20
# Integers up to this many digits are exact in a double: no float() needed.
_EXACT_DIGITS = 15

_BLOCK_SIZE = 64  # SHA-256 block size, which HMAC pads the key to
_IPAD = bytes(x ^ 0x36 for x in range(256))
_OPAD = bytes(x ^ 0x5C for x in range(256))

# CPython's own SHA-256 copies its state with a memcpy where OpenSSL's copies
# an EVP context; for the two copies per line of a short HMAC that is about
# 30% faster (see the README, Performance).  Use it when this Python has it.
try:
    from _sha2 import sha256 as _sha256  # Python 3.12 and newer
except ImportError:
    try:
        from _sha256 import sha256 as _sha256  # Python 3.9 to 3.11
    except ImportError:  # pragma: no cover - a Python built without it
        _sha256 = hashlib.sha256

_b2a_base64 = binascii.b2a_base64
_SIGNATURE_LENGTH = 44  # base64 of 32 bytes
_UNLIMITED = float("inf")


def _as_bytes(text):
    return text.encode("utf-8") if isinstance(text, str) else text


def sign(secret, signed_text):
    """Return the base64 signature (str) of ``signed_text`` under ``secret``."""
    digest = hmac.digest(_as_bytes(secret), _as_bytes(signed_text), "sha256")
    return _b2a_base64(digest, newline=False).decode("ascii")


def signed_line(secret, metric, value, timestamp, public_key):
    """Return the wire line (bytes, with ``\\n``) for one data point."""
    text = "%s %s %d %s" % (metric, value, int(timestamp), public_key)
    return ("%s %s\n" % (text, sign(secret, text))).encode("utf-8")


class Signer:
    """HMAC-SHA256 with the key's inner and outer hash states computed once.

    Copying two prepared SHA-256 states costs well under half of
    ``hmac.digest``, which pads and hashes the key again for every line.
    """

    __slots__ = ("inner", "outer")

    def __init__(self, secret):
        key = _as_bytes(secret)
        if len(key) > _BLOCK_SIZE:
            key = hashlib.sha256(key).digest()
        key = key.ljust(_BLOCK_SIZE, b"\0")
        self.inner = _sha256(key.translate(_IPAD))
        self.outer = _sha256(key.translate(_OPAD))

    def signature(self, signed_text):
        """Return the base64 signature of ``signed_text`` (bytes) as bytes."""
        inner = self.inner.copy()
        inner.update(signed_text)
        outer = self.outer.copy()
        outer.update(inner.digest())
        return _b2a_base64(outer.digest(), newline=False)


# Metric names.  carbon-cache decodes a line as UTF-8 (a bad byte drops the
# connection), splits it on any Unicode whitespace, turns dots into
# directories and takes "/" as one more; ";" starts tags and "{" an
# OpenMetrics name; a leading "~" is stripped (TaggedSeries.parse, even for a
# name without tags); glob characters are stored literally but cannot be
# queried.  A name is forwarded only if carbon stores it as exactly the
# series it names.  The common case, a short ASCII name, is one regex match.
_NAME_FORBIDDEN = "/;*?[]{}"
_NODE_CHAR = rb"[^\x00-\x20\x7f-\xff./;*?\[\]{}]"
PLAIN_NAME = rb"(?!~)%s+(?:\.%s+)*" % (_NODE_CHAR, _NODE_CHAR)  # and short: see below
_PLAIN_NAME = re.compile(PLAIN_NAME + rb"\Z").match


def _character_problem(text, forbidden):
    for char in text:
        if char.isspace() or char in forbidden or \
                unicodedata.category(char) in ("Cc", "Cf"):
            return "character %r" % char
    return None


def _name_problem(name):
    """Why carbon would not store ``name`` (bytes, no tags) as that series; None if it would."""
    if len(name) <= MAX_LAST_NODE_BYTES and _PLAIN_NAME(name):
        return None
    try:
        text = name.decode("utf-8")
    except UnicodeDecodeError:
        return "not UTF-8"
    if len(name) > MAX_METRIC_BYTES:
        return "longer than %d bytes" % MAX_METRIC_BYTES
    nodes = name.split(b".")
    if not all(nodes):
        return "an empty node (a leading, trailing or doubled dot)"
    if max(map(len, nodes[:-1]), default=0) > MAX_NODE_BYTES:
        return "a node longer than %d bytes" % MAX_NODE_BYTES
    if len(nodes[-1]) > MAX_LAST_NODE_BYTES:
        return "a last node longer than %d bytes" % MAX_LAST_NODE_BYTES
    if text.startswith("~"):
        return "a leading ~, which carbon strips"
    return _character_problem(text, _NAME_FORBIDDEN)


def _tag_problem(tag):
    """Why carbon's TaggedSeries.parse_carbon would refuse ``tag`` (text); None if not."""
    key, _, value = tag.partition("=")
    if not key or not value:
        return "tag %r is not key=value" % tag
    if any(char in key for char in "!^"):
        return "tag name %r has ! or ^" % key
    if value.startswith("~"):
        return "tag value %r starts with ~" % value
    return _character_problem(tag, _NAME_FORBIDDEN)


def metric_problem(metric, allow_tags=False):
    """Why the metric (bytes) of a signed line is refused (text); None if it passes.

    With ``allow_tags``, ``name;tag=value;...`` is checked as carbon parses it.
    """
    if allow_tags and b";" in metric:
        if len(metric) > MAX_METRIC_BYTES:
            return "longer than %d bytes" % MAX_METRIC_BYTES
        name, _, tags = metric.partition(b";")
        try:
            tags = tags.decode("utf-8")
        except UnicodeDecodeError:
            return "not UTF-8"
        return _name_problem(name) or next(
            filter(None, map(_tag_problem, tags.split(";"))), None)
    problem = _name_problem(metric)
    if problem is None:
        return None
    if b";" in metric and not allow_tags:
        return "tags, which need --allow-tags"
    return problem


def filter_lines(lines, keys, now, max_skew, reject, allow_tags=False, rate_limiter=None,
                 _budgets=None):
    """Check lines (bytes, without line ending); return the Carbon lines of those that pass.

    ``keys[public_key]`` (bytes) gives None or a :class:`Signer` that also has
    ``metrics`` (a set of bytes), ``allows_pattern(metric)``, and ``matched``
    and ``remember_match(metric)`` for names a pattern has already allowed.  For each line
    that fails, ``reject(reason, public_key, metric)`` is called; the fields
    are None when the line could not be split.  For ``skew`` a fourth argument
    says how far ahead the line's timestamp is, and for ``badSignature`` whether
    the key's previous secret, past its grace, signed the line.  The checks run in the
    original's order (shape, key, signature, skew, metric) and then the value;
    the metric name is checked (:func:`metric_problem`) before the allow list,
    except for exact names from the auth file, which were checked at load.
    Surrounding whitespace is trimmed and empty lines are skipped, as the
    original does.  Each accepted line gives its ``metric value timestamp``
    part, without a newline: see :func:`carbon_payload`.  Each key object counts
    its accepted lines (``accepted``), for the device table, and ``keys`` keeps
    the public key of the last line accepted (``last_accepted``).
    A ``rate_limiter`` (see :mod:`amproxy.ratelimit`), if given, is asked
    once per key for the lines it may still send (``budget``); the lines
    past that are rejected, and what was spent is told back (``spend``).
    For a limited key, a line identical to one it already had accepted (a
    capture re-sent while its timestamp is in the window) is rejected as
    ``replayed`` before it draws on the rate (``rate_limiter.table.replays``).

    This is the proxy's hot path, so it is one flat loop with the signature
    check written out: each function call costs a visible share per line.
    Whitespace is trimmed only on the failure paths, where it can matter.
    """
    accepted = []
    append = accepted.append
    last_accepted = None
    # Public key -> lines it may still send; a trimmed line's recursive call shares it.
    budgets = _budgets
    if budgets is None and rate_limiter is not None:
        budgets = {}
    if rate_limiter is not None:
        replayed = rate_limiter.table.replays.replayed
        replay_window = int(2 * max_skew) + 1  # a line passes for at most twice the skew
    compare = hmac.compare_digest
    oldest, newest = int(now - max_skew), int(now + max_skew)
    # Timestamps of the same number of digits compare as bytes, which is much
    # cheaper than int(); others (leading zeros, another century) use int().
    oldest_text, newest_text = b"%d" % oldest, b"%d" % newest
    digits = len(oldest_text) if len(oldest_text) == len(newest_text) else -1
    for line in lines:
        fields = line.split(b" ")
        if len(fields) != 5:
            if _retry_trimmed(line, accepted, keys, now, max_skew, reject, allow_tags,
                              rate_limiter, budgets):
                continue
            reject(MALFORMED, None, None)
            continue
        metric, value, timestamp, public_key, signature = fields
        if not timestamp.isdigit():
            reject(MALFORMED, public_key, metric)
            continue
        key = keys[public_key]
        if key is None:
            reject(UNKNOWN_KEY, public_key, metric)
            continue
        signed_length = len(line) - len(signature) - 1
        inner = key.inner.copy()
        inner.update(line[:signed_length])
        outer = key.outer.copy()
        outer.update(inner.digest())
        if not compare(_b2a_base64(outer.digest(), newline=False), signature) and not (
                # A key in rotation: its previous secret, until it expires.
                key.previous_until > now and
                compare(key.previous.signature(line[:signed_length]), signature)):
            # Whitespace around the line (a tab, say) shows as a signature of
            # the wrong length or a metric starting with it.
            if (len(signature) != _SIGNATURE_LENGTH or not metric[:1] > b" ") and \
                    _retry_trimmed(line, accepted, keys, now, max_skew, reject, allow_tags,
                                   rate_limiter, budgets):
                continue
            # Signed with the previous secret after its grace: the device was not told.
            reject(BAD_SIGNATURE, public_key, metric, key.previous is not None and compare(
                key.previous.signature(line[:signed_length]), signature))
            continue
        if len(timestamp) == digits:
            in_window = oldest_text <= timestamp <= newest_text
        elif len(timestamp) > MAX_TIMESTAMP_BYTES:  # leading zeros; int() has limits
            reject(MALFORMED, public_key, metric)
            continue
        else:
            in_window = oldest <= int(timestamp) <= newest
        if not in_window:
            reject(SKEW, public_key, metric, int(timestamp) - now)  # > 0: the device is ahead
            continue
        if metric not in key.metrics and metric not in key.matched:
            if metric_problem(metric, allow_tags) is not None:
                reject(BAD_METRIC, public_key, metric)
                continue
            name = metric.partition(b";")[0] if allow_tags else metric
            if name not in key.metrics and not key.allows_pattern(name):
                reject(METRIC_NOT_ALLOWED, public_key, metric)
                continue
            key.remember_match(metric)
        if not value.isdigit() or len(value) > _EXACT_DIGITS:
            try:
                # From bytes: ASCII only.  Overlong digit strings become inf.
                number = float(value) if len(value) <= MAX_VALUE_BYTES else None
            except ValueError:
                number = None
            if number is None or number - number != 0.0:  # not a number, inf or nan
                reject(BAD_VALUE, public_key, metric)
                continue
        if budgets is not None:
            try:
                left = budgets[public_key]  # a subscript: cheaper than .get()
            except KeyError:
                left = budgets[public_key] = rate_limiter.budget(public_key, key)
            if left != _UNLIMITED:
                # Remembered only if it passes: a line refused now may come again.
                if replayed(hash(signature), now, replay_window, left >= 1.0):
                    reject(REPLAYED, public_key, metric)
                    continue
                if left < 1.0:
                    reject(RATE_LIMITED, public_key, metric)
                    continue
                budgets[public_key] = left - 1.0
        append(line[:signed_length - len(public_key) - 1])
        key.accepted += 1  # on the worker's cached key object: no lookup
        last_accepted = public_key
    if last_accepted is not None:  # which device a connection is (signed lines only)
        keys.last_accepted = last_accepted
    if budgets and _budgets is None:  # the outermost call tells what was spent
        rate_limiter.spend(budgets)
    return accepted


def _retry_trimmed(line, accepted, keys, now, max_skew, reject, allow_tags, rate_limiter,
                   budgets):
    """A line that failed may pass without surrounding whitespace (or be empty).

    Returns True if the trimmed line was handled (checked, or skipped as empty).
    """
    trimmed = line.strip()
    if trimmed == line and trimmed:
        return False
    if trimmed:
        accepted.extend(filter_lines((trimmed,), keys, now, max_skew, reject, allow_tags,
                                     rate_limiter, budgets))
    return True


def carbon_payload(accepted):
    """The bytes to send to Carbon for what :func:`filter_lines` accepted."""
    return b"\n".join(accepted) + b"\n"


def check_line(line, keys, now, max_skew, allow_tags=False):
    """Check one line; return None if it passes (or is empty), else the rejection reason."""
    reasons = []
    filter_lines((line,), keys, now, max_skew,
                 lambda reason, public_key, metric, detail=None: reasons.append(reason),
                 allow_tags=allow_tags)
    return reasons[0] if reasons else None
