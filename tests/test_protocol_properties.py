"""Property-based tests: the parser never raises, and never accepts a forged line."""
import base64
import hashlib
import hmac
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from amproxy.auth import AuthKey
from amproxy.protocol import filter_lines

NOW = 1764201600
SKEW = 300
SECRETS = {b"k1": b"secret-one", b"k2": b"\xc3\xbcnic\xc3\xb8de-" * 9}
ALLOWED = {b"k1": {b"a.b", b"c"}, b"k2": {b"a.b"}}


KEYS = {name: AuthKey(name.decode(), SECRETS[name], [m.decode() for m in ALLOWED[name]])
        for name in SECRETS}


def oracle(line):
    """Independent statement of when a line must be forwarded."""
    line = line.strip()
    fields = line.split(b" ")
    if len(fields) != 5:
        return None
    metric, value, timestamp, public_key, signature = fields
    if public_key not in SECRETS or not metric or not timestamp.isdigit():
        return None
    text = line[:len(line) - len(signature) - 1]
    want = base64.b64encode(hmac.new(SECRETS[public_key], text, hashlib.sha256).digest())
    if want != signature or abs(NOW - int(timestamp)) > SKEW:
        return None
    if metric not in ALLOWED[public_key]:
        return None
    try:
        if not value.isascii() or not math.isfinite(float(value)):
            return None
    except ValueError:
        return None
    return b"%s %s %s" % (metric, value, timestamp)


def run(lines):
    rejected = []
    accepted = filter_lines(lines, KEYS, NOW, SKEW, lambda *r: rejected.append(r))
    return accepted, rejected


@settings(max_examples=500)
@given(st.lists(st.binary(max_size=200), max_size=20))
def test_never_raises_on_any_bytes(lines):
    accepted, rejected = run(lines)
    assert len(accepted) + len(rejected) <= len(lines)
    assert accepted == [a for a in map(oracle, lines) if a is not None]


fields = st.fixed_dictionaries({
    "metric": st.sampled_from([b"a.b", b"c", b"a.b.c", b"", b"a b", b"\xff"]),
    "value": st.one_of(st.sampled_from([b"1", b"-2.5", b"nan", b"inf", b"1e999", b"x",
                                        b"", b"1_0", b"\xd9\xa1"]),
                       st.floats().map(lambda f: repr(f).encode())),
    "ts": st.one_of(st.integers(NOW - 2 * SKEW, NOW + 2 * SKEW).map(lambda t: b"%d" % t),
                    st.sampled_from([b"-1", b"1.5", b"", b"+%d" % NOW])),
    "key": st.sampled_from([b"k1", b"k2", b"k3", b""]),
    "sign_with": st.sampled_from([b"k1", b"k2", None]),
    "padding": st.sampled_from([b"", b" ", b"\r", b"\t "]),
})


@settings(max_examples=1500)
@given(fields, st.integers(0, 80), st.integers(0, 255), st.booleans())
def test_accepts_exactly_the_validly_signed_allowed_lines(f, position, byte, mutate):
    text = b" ".join([f["metric"], f["value"], f["ts"], f["key"]])
    if f["sign_with"] is None:
        signature = base64.b64encode(b"\x00" * 32)
    else:
        signature = base64.b64encode(hmac.new(SECRETS[f["sign_with"]], text,
                                              hashlib.sha256).digest())
    line = text + b" " + signature + f["padding"]
    if mutate and position < len(line):
        line = line[:position] + bytes([byte]) + line[position + 1:]
    accepted, _ = run([line])
    want = oracle(line)
    assert accepted == ([want] if want is not None else [])


def test_the_generator_reaches_accepted_lines():
    """Guard against a vacuous property: valid lines must be among the examples."""
    seen = []

    @settings(max_examples=300, derandomize=True)
    @given(fields)
    def collect(f):
        text = b" ".join([f["metric"], f["value"], f["ts"], f["key"]])
        if f["sign_with"] is not None:
            line = text + b" " + base64.b64encode(hmac.new(
                SECRETS[f["sign_with"]], text, hashlib.sha256).digest())
            seen.append(bool(run([line])[0]))
    collect()
    assert any(seen) and not all(seen)
