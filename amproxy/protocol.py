"""The wire protocol: split, sign and verify lines. Pure functions, no I/O.

A client sends ``metric value timestamp public_key signature``; the signature is
base64(HMAC-SHA256(secret, "metric value timestamp public_key")).  The signed
text is exactly the received bytes before the last space.
"""

import binascii
import hashlib
import hmac
import math

# Rejection reasons.  The values are the names used in logs and self-metrics.
MALFORMED = "malformed"
UNKNOWN_KEY = "unknownKey"
BAD_SIGNATURE = "badSignature"
SKEW = "skew"
METRIC_NOT_ALLOWED = "metricNotAllowed"
BAD_VALUE = "badValue"
LINE_TOO_LONG = "lineTooLong"

REJECTION_REASONS = (MALFORMED, UNKNOWN_KEY, BAD_SIGNATURE, SKEW,
                     METRIC_NOT_ALLOWED, BAD_VALUE, LINE_TOO_LONG)

_BLOCK_SIZE = 64  # SHA-256 block size, which HMAC pads the key to
_IPAD = bytes(x ^ 0x36 for x in range(256))
_OPAD = bytes(x ^ 0x5C for x in range(256))


def _as_bytes(text):
    return text.encode("utf-8") if isinstance(text, str) else text


def sign(secret, signed_text):
    """Return the base64 signature (str) of ``signed_text`` under ``secret``."""
    digest = hmac.digest(_as_bytes(secret), _as_bytes(signed_text), "sha256")
    return binascii.b2a_base64(digest, newline=False).decode("ascii")


def signed_line(secret, metric, value, timestamp, public_key):
    """Return the wire line (bytes, with ``\\n``) for one data point."""
    text = "%s %s %d %s" % (metric, value, int(timestamp), public_key)
    return ("%s %s\n" % (text, sign(secret, text))).encode("utf-8")


class Signer:
    """HMAC-SHA256 with the key's inner and outer hash states computed once.

    Copying two prepared SHA-256 states is about twice as fast as
    ``hmac.digest``, which pads and hashes the key again for every line.
    """

    __slots__ = ("_inner", "_outer")

    def __init__(self, secret):
        key = _as_bytes(secret)
        if len(key) > _BLOCK_SIZE:
            key = hashlib.sha256(key).digest()
        key = key.ljust(_BLOCK_SIZE, b"\0")
        self._inner = hashlib.sha256(key.translate(_IPAD))
        self._outer = hashlib.sha256(key.translate(_OPAD))

    def signature(self, signed_text):
        """Return the base64 signature of ``signed_text`` as bytes."""
        inner = self._inner.copy()
        inner.update(signed_text)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return binascii.b2a_base64(outer.digest(), newline=False)

    def matches(self, signed_text, signature):
        """Compare in constant time, on the base64 text, without decoding it."""
        return hmac.compare_digest(self.signature(signed_text), signature)


def is_valid_value(value):
    """True if ``value`` (bytes) is a finite number Carbon will store."""
    if not value.isascii():
        return False
    try:
        return math.isfinite(float(value))
    except ValueError:
        return False


def filter_lines(lines, keys, now, max_skew, reject):
    """Check lines (bytes, without ``\\n``) and return the Carbon lines for those that pass.

    ``keys`` maps a public key (bytes) to an object with a ``signer`` (a
    :class:`Signer`) and an ``allows(metric)`` method.  For each line that
    fails, ``reject(reason, public_key, metric)`` is called; the fields are
    None when the line could not be split.  The checks run in the original's
    order (shape, key, signature, skew, metric) and then the value.
    Surrounding whitespace is trimmed and empty lines are skipped, as the
    original does.

    This is the proxy's hot path: it is one flat loop on purpose.
    """
    accepted = []
    append = accepted.append
    for line in lines:
        line = line.strip()
        if not line:
            continue
        fields = line.split(b" ")
        if len(fields) != 5:
            reject(MALFORMED, None, None)
            continue
        metric, value, timestamp, public_key, signature = fields
        if not timestamp.isdigit() or not metric:
            reject(MALFORMED, public_key, metric)
            continue
        key = keys.get(public_key)
        if key is None:
            reject(UNKNOWN_KEY, public_key, metric)
            continue
        if not key.signer.matches(line[:-len(signature) - 1], signature):
            reject(BAD_SIGNATURE, public_key, metric)
            continue
        if abs(now - int(timestamp)) > max_skew:
            reject(SKEW, public_key, metric)
            continue
        if not key.allows(metric):
            reject(METRIC_NOT_ALLOWED, public_key, metric)
            continue
        if not is_valid_value(value):
            reject(BAD_VALUE, public_key, metric)
            continue
        append(b"%s %s %s\n" % (metric, value, timestamp))
    return accepted


def check_line(line, keys, now, max_skew):
    """Check one line; return None if it passes, else the rejection reason."""
    reasons = []
    filter_lines((line,), keys, now, max_skew,
                 lambda reason, public_key, metric: reasons.append(reason))
    return reasons[0] if reasons else None
