"""Property-based tests: the parser never raises, and never accepts a forged line."""
import base64
import hashlib
import hmac
import math
import unicodedata

from hypothesis import given, settings
from hypothesis import strategies as st

from amproxy.auth import AuthKey, KeyMap
from amproxy.patterns import compile_patterns
from amproxy.protocol import filter_lines

NOW = 1764201600
SKEW = 300
SECRETS = {b"k1": b"secret-one", b"k2": b"\xc3\xbcnic\xc3\xb8de-" * 9}
ALLOWED = {b"k1": {b"a.b", b"c"}, b"k2": {b"a.b"}}


KEYS = KeyMap((name, AuthKey(name.decode(), SECRETS[name], [m.decode() for m in ALLOWED[name]]))
              for name in SECRETS)


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


# Metric names: a key allowed "p.**" signs arbitrary bytes after "p.".  Carbon
# (its own parser as the oracle) must store such a line as exactly that series.
PATTERN_KEY = AuthKey("pk", b"pattern-secret", [], ("p.**",), compile_patterns(["p.**"]))
NAME_BYTES = [b"a", b"0", b"-", b".", b"/", b";", b"=", b"*", b"?", b"[", b"{", b"}", b"~",
              b"\t", b"\x00", b"\x7f", b"\xff", b"\xc3", b"\xc3\xa9", b"\xc2\x85", b"\xc2\xa0",
              b"\xe2\x80\xa8", b"\xe2\x80\x8b", b"\x1c", b"\\", b"%", b"x" * 120]


def carbon_stores_as_named(metric):
    """Independent of amproxy: does carbon-cache 1.1.10 store this line's metric under that name?"""
    from carbon.util import TaggedSeries
    try:
        text = metric.decode("utf-8")
    except UnicodeDecodeError:
        return False  # carbon's lineReceived raises: the connection is dropped
    if text.split() != [text] or "\x00" in text:
        return False  # split apart (or cut by the C file API)
    try:
        if TaggedSeries.parse(text).path != text:
            return False  # tags, or a stripped "~"
    except Exception:
        return False
    nodes = text.split(".")
    return (";" not in text and "/" not in text and all(nodes)
            and not any(c in text for c in "*?[]{}")
            and all(len(n.encode()) <= 255 for n in nodes) and len(nodes[-1].encode()) <= 251
            and len(metric) <= 4000
            and not any(unicodedata.category(c) in ("Cc", "Cf") for c in text))


@settings(max_examples=1500)
@given(st.lists(st.sampled_from(NAME_BYTES), min_size=1, max_size=8))
def test_a_pattern_key_forwards_only_names_carbon_stores_as_named(parts):
    metric = b"p." + b"".join(parts)
    text = b"%s 1 %d pk" % (metric, NOW)
    line = text + b" " + base64.b64encode(hmac.new(b"pattern-secret", text,
                                                   hashlib.sha256).digest())
    if b"\n" in line or b"\r" in line:
        return
    rejected = []
    accepted = filter_lines([line], KeyMap({b"pk": PATTERN_KEY}), NOW, SKEW,
                            lambda *r: rejected.append(r))
    assert bool(accepted) == carbon_stores_as_named(metric), (metric, rejected)
