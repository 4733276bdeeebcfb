import pytest

from amproxy.auth import load_auth_file
from amproxy.errors import AuthFileError
from amproxy.patterns import PatternError, compile_patterns, translate

CASES = [
    # pattern, metric, matches
    ("home.*.temp", "home.alice.temp", True),
    ("home.*.temp", "home..temp", True),           # * matches an empty node
    ("home.*.temp", "home.alice.bob.temp", False),  # never across a dot
    ("home.*", "home.alice", True),
    ("home.*", "home.alice.temp", False),
    ("home.*", "home", False),
    ("sensor?", "sensor1", True),
    ("sensor?", "sensor12", False),
    ("sensor?", "sensor.", False),
    ("s.?", "s..", False),
    ("rack[0-9].cpu", "rack7.cpu", True),
    ("rack[0-9].cpu", "racka.cpu", False),
    ("rack[abc].cpu", "rackb.cpu", True),
    ("rack[!abc].cpu", "rackd.cpu", True),
    ("rack[!abc].cpu", "racka.cpu", False),
    ("rack[!abc].cpu", "rack..cpu", False),         # a negated class never matches a dot
    ("{web,db}01.load", "web01.load", True),
    ("{web,db}01.load", "db01.load", True),
    ("{web,db}01.load", "mail01.load", False),
    ("{web*,db}.load", "webserver.load", True),
    ("{web*,db}.load", "web.x.load", False),
    ("dev1.**", "dev1.a", True),
    ("dev1.**", "dev1.a.b.c", True),
    ("dev1.**", "dev1", False),
    ("dev1.**", "dev10.a", False),
    ("dev1.**", "dev1.", False),
    ("home.*.**", "home.alice.temp.max", True),
    ("home.*.**", "home.alice", False),
    ("a.b", "a.b", True),
    ("a.b", "aXb", False),                          # a dot is literal
    ("a+b.*", "a+b.c", True),                       # regex characters are literal
    ("a+b.*", "aab.c", False),
]


@pytest.mark.parametrize("pattern, metric, expected", CASES)
def test_pattern_table(pattern, metric, expected):
    assert compile_patterns([pattern])(metric.encode()) is expected


@pytest.mark.parametrize("pattern", ["a.**.b", "**", "a..b", "a.[b", "a.{b,c", "a.b]",
                                     "a.}", "a.[]", "a.{b,{c}}", ".a", "a.", "a**",
                                     "x[.]y"])
def test_malformed_patterns(pattern):
    with pytest.raises(PatternError):
        translate(pattern)


def test_several_patterns_in_one_matcher():
    match = compile_patterns(["a.*", "b.**"])
    assert match(b"a.x") and match(b"b.x.y") and not match(b"c.x")


def test_auth_file_mixes_exact_names_and_patterns(tmp_path):
    path = tmp_path / "auth.yaml"
    path.write_text("apikeys:\n  dev:\n    secret_key: s\n    metrics:\n    - exact.name\n"
                    "    - 'sensors.*.temp'\n    - dev.**\n")
    key = load_auth_file(str(path)).get(b"dev")
    assert key.metrics == {b"exact.name"}
    assert key.patterns == ("sensors.*.temp", "dev.**")
    assert key.allows(b"exact.name") and key.allows(b"sensors.a.temp")
    assert key.allows(b"dev.x.y") and not key.allows(b"sensors.a.b.temp")


def test_malformed_pattern_in_auth_file_names_key_and_pattern(tmp_path):
    path = tmp_path / "auth.yaml"
    path.write_text("apikeys:\n  dev:\n    secret_key: s\n    metrics:\n    - 'a.[b'\n")
    with pytest.raises(AuthFileError, match=r"key 'dev': bad metric pattern: unclosed \[ "
                                            r"in 'a.\[b'"):
        load_auth_file(str(path))
