import base64
import hashlib
import hmac
import json
import os

import pytest

from amproxy.auth import AuthKey, KeyMap
from amproxy.protocol import (BAD_SIGNATURE, BAD_VALUE, MALFORMED, METRIC_NOT_ALLOWED, SKEW,
                              UNKNOWN_KEY, Signer, carbon_payload, check_line, filter_lines,
                              sign,
                              signed_line)

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED_VECTORS = os.path.join(HERE, os.pardir, os.pardir, "shared", "reference",
                              "signature-vectors.json")
VECTORS_COPY = os.path.join(HERE, "data", "signature-vectors.json")


def load_vectors():
    path = SHARED_VECTORS if os.path.exists(SHARED_VECTORS) else VECTORS_COPY
    with open(path, encoding="utf-8") as f:
        return json.load(f)


VECTORS = load_vectors()


def test_vector_copy_matches_the_contract():
    if not os.path.exists(SHARED_VECTORS):
        pytest.skip("the shared reference directory is not beside this checkout")
    with open(VECTORS_COPY, encoding="utf-8") as f:
        assert json.load(f) == VECTORS


def test_there_are_vectors():
    assert len(VECTORS) >= 7


@pytest.mark.parametrize("vector", VECTORS, ids=[v["note"] for v in VECTORS])
def test_sign_reproduces_vector(vector):
    assert sign(vector["secret_key"], vector["signed_text"]) == vector["signature"]
    signer = Signer(vector["secret_key"])
    assert signer.signature(vector["signed_text"].encode()) == vector["signature"].encode()
    assert vector["wire_line"] == vector["signed_text"] + " " + vector["signature"]


def Key(secret, metrics):
    return AuthKey("k", secret, metrics)


@pytest.mark.parametrize("vector", VECTORS, ids=[v["note"] for v in VECTORS])
def test_vector_wire_lines_are_accepted(vector):
    metric, value, timestamp, public_key = vector["signed_text"].split(" ")
    keys = KeyMap({public_key.encode(): Key(vector["secret_key"], [metric])})
    line = vector["wire_line"].encode()
    assert check_line(line, keys, int(timestamp), 300) is None
    assert carbon_payload(filter_lines([line], keys, int(timestamp), 300, None)) == (
        "%s %s %s\n" % (metric, value, timestamp)).encode()


NOW = 1764201600
KEYS = KeyMap({b"pub": Key("sekrit", ["a.b", "c"]), b"other": Key("x", ["a.b"])})


def line(metric="a.b", value="1", timestamp=NOW, key="pub", secret="sekrit"):
    return signed_line(secret, metric, value, timestamp, key).rstrip(b"\n")


def reasons(*lines, now=NOW, skew=300):
    got = []
    accepted = filter_lines(lines, KEYS, now, skew, lambda r, k, m, *detail: got.append((r, k, m)))
    return accepted, got


def test_good_line_becomes_plain_carbon_line():
    accepted, rejected = reasons(line(value="42.5"), line(metric="c", value="7"))
    assert rejected == []
    assert carbon_payload(accepted) == b"a.b 42.5 %d\nc 7 %d\n" % (NOW, NOW)


@pytest.mark.parametrize("raw, reason", [
    (b"a.b 1 %d pub" % NOW, MALFORMED),                       # 4 fields
    (b"a.b 1 %d pub sig extra" % NOW, MALFORMED),             # 6 fields
    (b"a.b  1 %d pub sig" % NOW, MALFORMED),                  # double space
    (b"a.b 1 12.5 pub sig", MALFORMED),                        # float timestamp
    (b"a.b 1 -5 pub sig", MALFORMED),                          # negative timestamp
    (b"a.b 1 1_000 pub sig", MALFORMED),                       # Python-only int syntax
    (b"a.b 1 %d nobody sig" % NOW, UNKNOWN_KEY),
    (b"a.b 1 %d pub AAAA" % NOW, BAD_SIGNATURE),
    (b"a.b 1 %d pub " % NOW, MALFORMED),                       # trailing space trimmed
])
def test_rejections_before_the_signature(raw, reason):
    accepted, got = reasons(raw)
    assert accepted == []
    assert [r for r, _, _ in got] == [reason]


def test_signature_of_another_key_is_bad():
    assert reasons(line(key="pub", secret="x"))[1][0][0] == BAD_SIGNATURE


def test_signature_covers_every_field():
    good = line(value="1")
    tampered = good.replace(b"a.b 1 ", b"a.b 2 ", 1)
    assert reasons(tampered)[1][0][0] == BAD_SIGNATURE


def test_skew_in_both_directions_with_inclusive_limit():
    assert reasons(line(timestamp=NOW - 300))[1] == []
    assert reasons(line(timestamp=NOW + 300))[1] == []
    assert reasons(line(timestamp=NOW - 301))[1][0][0] == SKEW
    assert reasons(line(timestamp=NOW + 301))[1][0][0] == SKEW


def test_metric_must_be_listed_exactly():
    assert reasons(line(metric="a.b.c"))[1][0][0] == METRIC_NOT_ALLOWED
    assert reasons(line(metric="a"))[1][0][0] == METRIC_NOT_ALLOWED
    assert reasons(line(metric="c"))[1] == []
    assert reasons(line(metric="c", key="other", secret="x"))[1][0][0] == METRIC_NOT_ALLOWED


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "1e999", "abc", "",
                                   "0x10", "\u0661", "1,5"])
def test_non_finite_or_non_numeric_values_are_rejected(value):
    accepted, got = reasons(line(value=value))
    assert accepted == []
    assert got[0][0] == BAD_VALUE


@pytest.mark.parametrize("value", ["0", "-12.25", "1.5e3", "3", ".5", "1E-3"])
def test_finite_values_pass(value):
    assert reasons(line(value=value))[1] == []


def test_crlf_whitespace_and_empty_lines():
    accepted, got = reasons(line() + b"\r", b"", b"\r", b"   ", b"  " + line() + b" \t")
    assert got == []
    assert len(accepted) == 2


def test_rejection_reports_key_and_metric_not_secrets():
    _, got = reasons(line(metric="zzz"))
    assert got == [(METRIC_NOT_ALLOWED, b"pub", b"zzz")]


def test_signed_text_is_the_bytes_before_the_last_space():
    # Non-ASCII bytes in the metric are signed as received.
    text = "m\u00e9trique 1 %d pub" % NOW
    raw = text.encode() + b" " + sign("sekrit", text).encode()
    assert reasons(raw)[1][0][0] == METRIC_NOT_ALLOWED


def test_signer_matches_hmac_for_all_key_lengths():
    for length in (0, 1, 63, 64, 65, 200):
        secret = bytes(range(length % 256)) * (length // 256 + 1)
        secret = secret[:length]
        msg = b"a 1 2 k"
        want = base64.b64encode(hmac.new(secret, msg, hashlib.sha256).digest())
        assert Signer(secret).signature(msg) == want


def signed_raw(text, secret="sekrit"):
    return text.encode() + b" " + sign(secret, text).encode()


def test_skew_with_leading_zeros_and_other_lengths():
    assert reasons(signed_raw("a.b 1 0%d pub" % NOW))[1] == []  # leading zero: int()
    assert reasons(signed_raw("a.b 1 0%d pub" % (NOW - 301)))[1][0][0] == SKEW
    assert reasons(signed_raw("a.b 1 %d pub" % (NOW * 10)))[1][0][0] == SKEW
    assert reasons(signed_raw("a.b 1 5 pub"))[1][0][0] == SKEW
    # Around a change in the number of digits, both sides of the window count.
    edge = 10 ** 10
    keys = KEYS
    for ts, ok in ((edge - 300, True), (edge + 300, True), (edge - 301, False)):
        raw = signed_line("sekrit", "a.b", 1, ts, "pub").rstrip(b"\n")
        assert (check_line(raw, keys, edge, 300) is None) is ok


def _pattern_keys(*patterns, exact=()):
    from amproxy.patterns import compile_patterns
    return KeyMap({b"pk": AuthKey("pk", "s3cret", list(exact), tuple(patterns),
                                  compile_patterns(patterns) if patterns else None)})


@pytest.mark.parametrize("metric, allow_tags, reason", [
    ("home.bob.temp", False, None),
    ("home.bob/kitchen/x.temp", False, "badMetric"),   # "/" is a directory to carbon
    ("home..temp", False, "badMetric"),                # "*" must not match an empty node
    ("home.~x.temp", False, None),                     # "~" only matters leading the name
    ("home.bob;x=y.temp", False, "badMetric"),         # tags need --allow-tags
    ("home.bob;x=y.temp", True, "metricNotAllowed"),   # then the name is home.bob
    ("home.bob.temp;x=y", True, None),
    ("home.bob.temp;x=~y", True, "badMetric"),         # carbon refuses the tag
    ("home.b\u00e9b.temp", False, None),               # UTF-8 is fine
    ("home.b\u00a0b.temp", False, "badMetric"),        # carbon splits on U+00A0
    ("home.%s.temp" % ("n" * 256), False, "badMetric"),
    ("home.*.temp", False, "badMetric"),               # a glob stored literally
])
def test_metric_names_are_checked_before_the_allow_list(metric, allow_tags, reason):
    keys = _pattern_keys("home.*.temp")
    line = signed_line("s3cret", metric, 1, NOW, "pk").rstrip(b"\n")
    assert check_line(line, keys, NOW, 300, allow_tags=allow_tags) == reason


def test_an_exact_name_no_line_can_pass_is_not_a_way_around_the_rules():
    keys = _pattern_keys(exact=["good.name", "bad..name"])
    for metric, reason in (("good.name", None), ("bad..name", "badMetric")):
        line = signed_line("s3cret", metric, 1, NOW, "pk").rstrip(b"\n")
        assert check_line(line, keys, NOW, 300) == reason


def test_absurd_numbers_are_refused_without_raising():
    keys = _pattern_keys(exact=["m"])
    def check(value, timestamp):
        text = b"m %s %s pk" % (value, timestamp)
        return check_line(text + b" " + sign("s3cret", text).encode(), keys, NOW, 300)
    assert check(b"1", b"0" * 4400 + b"%d" % NOW) == "malformed"  # int() would raise
    assert check(b"1", b"000%d" % NOW) is None
    assert check(b"9" * 5000, b"%d" % NOW) == "badValue"  # carbon would store inf
    assert check(b"9" * 40, b"%d" % NOW) is None


# -- key rotation: the previous secret signs too, until it expires ------------------

@pytest.mark.parametrize("vector", VECTORS, ids=[v["note"] for v in VECTORS])
def test_vector_wire_lines_pass_under_the_current_and_the_previous_secret(vector):
    metric, value, timestamp, public_key = vector["signed_text"].split(" ")
    now = int(timestamp)
    line = vector["wire_line"].encode()
    as_current = AuthKey("k", vector["secret_key"], [metric], previous_secret="old",
                         previous_until=now + 60)
    as_previous = AuthKey("k", "the-new-secret", [metric],
                          previous_secret=vector["secret_key"], previous_until=now + 60)
    for key in (as_current, as_previous):
        assert check_line(line, KeyMap({public_key.encode(): key}), now, 300) is None
    # Once the previous secret has expired, its lines are refused without a reload.
    expired = AuthKey("k", "the-new-secret", [metric], previous_secret=vector["secret_key"],
                      previous_until=now)
    assert check_line(line, KeyMap({public_key.encode(): expired}), now, 300) == "badSignature"


def test_a_third_secret_never_passes_during_rotation():
    key = AuthKey("k", "new", ["a.b"], previous_secret="old", previous_until=NOW + 60)
    keys = KeyMap({b"pub": key})
    assert check_line(line(secret="new"), keys, NOW, 300) is None
    assert check_line(line(secret="old"), keys, NOW, 300) is None
    assert check_line(line(secret="older"), keys, NOW, 300) == "badSignature"
    assert check_line(line(secret="old"), keys, NOW + 60, 300) == "badSignature"


def test_accepted_lines_are_counted_per_key_whatever_their_order():
    """The device table's counts: each key object counts its accepted lines, and the
    key map hands them over once (then they start again)."""
    lines = [line(key="pub"), line(key="pub", value="2"), line(key="other", secret="x"),
             line(key="pub", value="3"), line(key="nobody"), line(key="other", secret="x",
                                                                   value="4")]
    KEYS.take_counts()
    accepted = filter_lines(lines, KEYS, NOW, 300, lambda *rejection: None)
    assert len(accepted) == 5
    assert KEYS.take_counts() == {b"pub": 3, b"other": 2}
    assert KEYS.take_counts() == {}
