"""The standard-layout scanner and the snapshot the workers map: they must mean what
YAML means, for every file, and look every key up as the full parse does."""
import os

import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from amproxy import authsnapshot
from amproxy.auth import load_auth_file, parse_auth_data, parse_auth_file
from amproxy.authscan import scan
from amproxy.authsnapshot import AuthSnapshot, compile_snapshot, write_snapshot
from amproxy.errors import AuthFileError

PATH = "/etc/amproxy/auth.yaml"


def summary(key):
    secret, _, previous, until, max_rate = key.entry()
    return (key.name, secret, sorted(key.metric_names), sorted(key.patterns), previous, until,
            max_rate)


def yaml_oracle(raw):
    """What the YAML parser alone makes of the file: its keys' summaries, or the error."""
    try:
        data = yaml.load(raw, Loader=yaml.BaseLoader)
        db = parse_auth_data(data, PATH)
    except yaml.YAMLError:
        return "not YAML"
    except AuthFileError as e:
        return str(e)
    return {name: summary(key) for name, key in db.keys.items()}


def full_parse(raw):
    """What the full parse (simple-layout parser, else YAML) made of the file before
    snapshots: its keys' summaries, or the error."""
    try:
        db = parse_auth_file(raw, PATH)
    except AuthFileError as e:
        return str(e)
    return {name: summary(key) for name, key in db.keys.items()}


def snapshot_of(raw, tmp_path):
    path = tmp_path / "auth.yaml"
    path.write_bytes(raw)
    fd = os.memfd_create("test")
    try:
        write_snapshot(str(path), fd)
        return AuthSnapshot(fd)
    finally:
        os.close(fd)


# -- files built from pieces, some of them wrong on purpose -------------------------

# Mostly what the standard layout holds, and now and then what it must not take.
@st.composite
def mostly(draw, usual, odd):
    return draw(usual) if draw(st.integers(0, 11)) else draw(st.sampled_from(odd))


NAMES = mostly(st.builds("dev{}".format, st.integers(0, 50)), [
    "a.b-c_d/e", "0x1F", "yes", "null", "~x", "-x", "a:b", "a#b", "é", "x" * 300, "a b",
    "k" * 1024, "k" * 1025])
VALUES = mostly(st.sampled_from(["s3cr3t", "a+b/c=d", "0123", "...", "x%y", "~", "-abc",
                                 "+x=", "?q", "=="]), [
    "a#b", "'q'", "a: b", "@x", "", "a\tb", "-", "a b"])
METRICS = mostly(st.builds("home.t{}".format, st.integers(0, 9)) | st.sampled_from(
    ["home.*", "home.{a,b}", "home.[ab]", "h.**", "a]b", "a,b", "bad..name", "a;b=c",
     "x" * 300, "a.[b", "home.{a,", "'*.x'", "'{a,b}.y'", "'#'", "'a:b'"]),
    ["{a,b}", "[x]", "*.x", "~home", "é.x", "a b", "-a", "?a", "a#b", "'a b'", "''",
     "'it''s'", "'é'", "'a", "\"*.x\"", "'x' #c"])
EXPIRES = mostly(st.sampled_from(["2026-12-05T10:00:00Z", "2026-12-05T10:00:00.5+01:00"]),
                 ["2026-13-05T10:00:00Z", "2026-12-05T10:00:00", "soon"])
RATES = mostly(st.sampled_from(["5", "2.5", ".5", "1e3"]), ["0", "inf", "fast", "-1", "nan"])


@st.composite
def entries(draw, k, f, p):
    lines = ["%s%s:" % (k, draw(NAMES)), "%ssecret_key: %s" % (f, draw(VALUES))]
    if draw(st.integers(0, 3)) == 0:
        lines += ["%sprevious_secret_key: %s" % (f, draw(VALUES)),
                  "%sprevious_secret_expires: %s" % (f, draw(EXPIRES))]
    if draw(st.integers(0, 3)) == 0:
        lines.append("%smax_rate: %s" % (f, draw(RATES)))
    metrics = draw(st.lists(METRICS, max_size=4))
    lines.append("%smetrics:%s" % (f, "" if metrics else draw(mostly(st.just(" []"), [""]))))
    lines += ["%s%s" % (p, m) for m in metrics]
    if draw(st.integers(0, 9)) == 0:
        lines.insert(draw(st.integers(0, len(lines))), draw(st.sampled_from(
            ["", "  # a comment", "# top", "\t# tab", "    other: 1", " - x"])))
    return "\n".join(lines) + "\n"


@st.composite
def files(draw):
    key, field = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    item = draw(mostly(st.integers(0, 2), [-1]))
    k, f, p = " " * key, " " * (key + field), " " * (key + field + item) + "- "
    head = draw(mostly(st.sampled_from(["apikeys:\n", "---\napikeys:\n", "# keys\napikeys:\n",
                                        "apikeys:\n\n"]), ["apikeys: {}\n", "apikeys: \n"]))
    text = head + "".join(draw(st.lists(entries(k, f, p), min_size=1, max_size=5)))
    if draw(st.integers(0, 9)) == 0 and text:
        at = draw(st.integers(0, len(text) - 1))
        text = text[:at] + draw(st.sampled_from(["", " ", "\n", "#", "\x01", ":", "\r"])) + \
            text[at + 1:]
    return text.encode("utf-8")


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(files())
def test_the_scanner_means_what_yaml_means(raw):
    oracle = yaml_oracle(raw)
    try:
        scanned = scan(raw, PATH)
    except AuthFileError as e:
        assert str(e) == oracle == full_parse(raw)  # the same refusal, word for word
        return
    if scanned is None:
        return  # not the standard layout: the full parse reads it
    assert isinstance(oracle, dict), oracle
    assert full_parse(raw) == oracle
    assert len(scanned) == len(oracle)
    assert scanned.metric_count == sum(len(s[2]) for s in oracle.values())
    assert scanned.pattern_count == sum(len(s[3]) for s in oracle.values())


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(raw=files())
def test_a_snapshot_looks_up_every_key_as_the_full_parse_does(raw, tmp_path):
    oracle = full_parse(raw)
    if not isinstance(oracle, dict):
        with pytest.raises(AuthFileError):
            snapshot_of(raw, tmp_path)
        return
    snapshot = snapshot_of(raw, tmp_path)
    assert len(snapshot) == len(oracle)
    for name, expected in oracle.items():
        assert summary(snapshot.keys[name]) == expected
    assert snapshot.keys[b"absent"] is None


ODD = """\
apikeys:
  "site:1":
    secret_key: "two words"
    metrics: ["a.b", "é.c"]
  'back\\3a':
    secret_key: "line\\nbreak\\\\"
    previous_secret_key: 'old one'
    previous_secret_expires: 2030-01-01T00:00:00Z
    max_rate: 2.5
    metrics: ['x.{a,b}', y]
  plain: {secret_key: s, metrics: []}
"""


def test_a_file_only_yaml_reads_is_written_out_with_escapes(tmp_path):
    raw = ODD.encode()
    assert scan(raw, PATH) is None
    snapshot = snapshot_of(raw, tmp_path)
    (tmp_path / "odd.yaml").write_bytes(raw)
    full = load_auth_file(str(tmp_path / "odd.yaml"))
    assert len(snapshot) == len(full) == 3
    for name, key in full.keys.items():
        assert summary(snapshot.keys[name]) == summary(key)
    site = snapshot.keys[b"site:1"]
    assert site.signature(b"x") == full.keys[b"site:1"].signature(b"x")
    assert snapshot.keys[b"back\\3a"].allows(b"x.b")
    # Escapes are the snapshot's business: a device cannot name another key with them.
    for forged in (b"site\\3a1", b"back:", b"site", b"site:1\\", b"plain:", b"plain\n"):
        assert snapshot.keys[forged] is None, forged


def test_the_cache_of_built_keys_is_bounded_and_knows_no_none(tmp_path, monkeypatch):
    monkeypatch.setattr(authsnapshot, "MAX_CACHED_KEYS", 3)
    raw = ("apikeys:\n" + "".join(
        "  k%d:\n    secret_key: s%d\n    metrics:\n    - m.%d\n" % (i, i, i)
        for i in range(10))).encode()
    snapshot = snapshot_of(raw, tmp_path)
    for round_ in range(2):
        for i in range(10):
            assert snapshot.keys[b"k%d" % i].allows(b"m.%d" % i)
            assert len(snapshot.keys) <= 3
    assert None not in snapshot.keys and b"" not in snapshot.keys
    assert b"k1" in snapshot.keys and b"k10" not in snapshot.keys


def test_a_snapshot_is_sealed_and_names_the_file_it_refuses(tmp_path):
    path = tmp_path / "auth.yaml"
    path.write_text("apikeys:\n  k:\n    secret_key: s\n    max_rate: fast\n    metrics: []\n")
    refused = compile_snapshot(str(path))
    assert refused.fd is None and not refused.retry
    assert refused.error == "auth file %s: key 'k': max_rate is not a number of " \
        "lines per second above 0" % path
    path.write_text("apikeys:\n  k:\n    secret_key: s\n    metrics: []\n")
    fd = compile_snapshot(str(path)).fd
    try:
        with pytest.raises(PermissionError):
            os.write(fd, b"x")
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)


def test_a_large_file_outside_the_standard_layout_is_pointed_out(tmp_path, caplog):
    from amproxy import keytool
    path = tmp_path / "auth.yaml"
    path.write_text("apikeys:\n" + "".join(
        '  "k%d": {secret_key: s%d, metrics: [m.%d]}\n' % (i, i, i) for i in range(1000)))
    with caplog.at_level("WARNING"):
        keytool.check(str(path))
    assert "is not in the standard layout" in caplog.text
    assert not snapshot_of(path.read_bytes(), tmp_path).standard
    caplog.clear()
    keytool.add_key(str(tmp_path / "std.yaml"), "k", ["m"])
    with caplog.at_level("WARNING"):
        keytool.check(str(tmp_path / "std.yaml"))
    assert "standard layout" not in caplog.text


def test_a_backslash_in_the_standard_layout_is_a_backslash_as_yaml_reads_it(tmp_path):
    """Issue 21, finding 1: the snapshot's own escapes apply only to a snapshot written
    from YAML; read in place, '\\2e' is three characters, not a dot."""
    raw = (b"apikeys:\n  alice:\n    secret_key: alice-secret\n    metrics:\n"
           b"    - 'home\\2e*\\2etemp'\n    - 'home.carol.*\\5b'\n"
           b"  bob:\n    secret_key: bob-secret\n    metrics:\n    - home.bob.temp\n")
    assert scan(raw, PATH) is not None  # the standard layout: read in place
    snapshot = snapshot_of(raw, tmp_path)
    (tmp_path / "same.yaml").write_bytes(raw)
    full = load_auth_file(str(tmp_path / "same.yaml"))
    alice = snapshot.keys[b"alice"]
    assert summary(alice) == summary(full.keys[b"alice"])
    assert not alice.allows(b"home.bob.temp")  # bob's series stays bob's
    assert alice.allows(b"home\\2eX\\2etemp") == full.keys[b"alice"].allows(b"home\\2eX\\2etemp")
    assert not alice.allows(b"home.carol.x[")
    assert snapshot.keys[b"bob"].allows(b"home.bob.temp")


# -- one grammar: what the workers enforce, `keys list` and `check` all read the file
# as PyYAML does, or refuse it (issue 21, findings 2, 8 and 10) ------------------------

def _duplicate_key(node, seen=None):
    """Whether any mapping in the composed document gives a key twice (YAML 1.2: an error)."""
    seen = set() if seen is None else seen
    if id(node) in seen:
        return False
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        keys = [k.value for k, _ in node.value if isinstance(k, yaml.ScalarNode)]
        if len(keys) != len(set(keys)):
            return True
        return any(_duplicate_key(k, seen) or _duplicate_key(v, seen) for k, v in node.value)
    if isinstance(node, yaml.SequenceNode):
        return any(_duplicate_key(item, seen) for item in node.value)
    return False


# PyYAML as it is installed: with libyaml, as Debian's python3-yaml and PyPI's wheels
# ship it (the pure-Python parser refuses a few files with tabs that libyaml takes).
LOADER = getattr(yaml, "CBaseLoader", yaml.BaseLoader)


def pure_yaml(raw):
    """What PyYAML alone (base schema) reads, the keys' summaries, or None where it
    refuses the file, or YAML 1.2 would (a duplicate key), or the checks do."""
    try:
        if _duplicate_key(yaml.compose(raw, Loader=LOADER)):
            return None
        db = parse_auth_data(yaml.load(raw, Loader=LOADER), PATH)
    except (yaml.YAMLError, AuthFileError, RecursionError):
        return None
    return {name: summary(key) for name, key in db.keys.items()}


def _keys_list_and_check(path):
    from amproxy import keytool
    try:
        summary_line = keytool.check(path)
        listed = sorted(line.split("\t")[0] for line in keytool.describe(path))
    except AuthFileError:
        return None
    assert summary_line.startswith("auth file %s is valid" % path)
    return listed


def assert_read_as_yaml_reads_it(raw, tmp_path):
    oracle = pure_yaml(raw)
    path = tmp_path / "auth.yaml"
    path.write_bytes(raw)
    listed = _keys_list_and_check(str(path))
    if oracle is None:
        with pytest.raises(AuthFileError):
            snapshot_of(raw, tmp_path)
        assert listed is None, "keys list and check take a file YAML refuses"
        return
    snapshot = snapshot_of(raw, tmp_path)
    assert len(snapshot) == len(oracle)
    for name, expected in oracle.items():
        assert summary(snapshot.keys[name]) == expected
    assert listed == sorted(name.decode() for name in oracle)


# What a hand edit, a generator's bug or an attacker puts into a file.
FRAGMENTS = ["\\", "\\2e", "\\x2e", "\\n", "\\\\", '"', "'", "''", '"\\x41"', "'a\\'",
             "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029", "\x0b", "\x0c", "\t",
             "\r", "\r\n", "\x00", "\ufeff", "\n        - home.bob.temp",
             "\n          home.bob", "\n  - home.bob.temp", "\n- home.bob.temp",
             " - home.bob.temp", "&a ", "*a", " &a", "&a", " # c", "\n# c", "\n  # c",
             ": ", ":", "{", "}", "[", "]", ",", "---\n", "\n...\n", "? ", "!", "|",
             ">", "%", "@", "`", "\n  dev1:\n    secret_key: again\n    metrics: []"]


@st.composite
def hostile_files(draw):
    raw = draw(files()).decode("utf-8")
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.sampled_from(FRAGMENTS)) + raw[at:]
    if draw(st.integers(0, 5)) == 0:  # an alias of another key's metrics
        raw += "  aliased:\n    secret_key: s\n    metrics: *a\n"
    return raw.encode("utf-8")


FINDINGS = [
    # A more-indented item is one scalar to YAML ("home.alice.temp - home.bob.temp").
    b"apikeys:\n  alice:\n    secret_key: alice-secret\n    metrics:\n"
    b"    - home.alice.temp\n    # bob's\n      - home.bob.temp\n",
    b"apikeys:\n  alice:\n    metrics:\n    - home.alice.temp\n      - home.bob.temp\n"
    b"    secret_key: alice-secret\n",
    # \x1c ends a line for str.splitlines, not for YAML (which refuses the byte).
    b"apikeys:\n  alice:\n    metrics:\n    - home.alice.temp\x1c    - home.bob.temp\n"
    b"    secret_key: alice-secret\n",
    # A key given twice: YAML 1.2 says error; PyYAML would take the last.
    b"apikeys:\n  alice:\n    secret_key: s1\n    metrics: []\n"
    b"  alice:\n    secret_key: s2\n    metrics: [home.bob.temp]\n",
    b"apikeys:\n  alice:\n    secret_key: s1\n    metrics: []\n    secret_key: s2\n",
]


@pytest.mark.parametrize("raw", [
    b"apikeys:\n  alice:\n    secret_key: alice\tsecret\n    metrics: [home.a]\n",
    b"apikeys:\n  alice:\n    secret_key: s\n    metrics:\n    - home.a\t#x\n",
    b"apikeys:\n  alice:\n    secret_key:\ts\n    metrics: []\n",
    b"apikeys:\n  alice\t:\n    secret_key: s\n    metrics: []\n"])
def test_tabs_are_read_as_the_installed_yaml_reads_them(raw, tmp_path):
    assert_read_as_yaml_reads_it(raw, tmp_path)


@pytest.mark.parametrize("raw", FINDINGS)
def test_what_yaml_refuses_or_reads_otherwise_is_refused(raw, tmp_path):
    assert pure_yaml(raw) is None
    assert_read_as_yaml_reads_it(raw, tmp_path)


@settings(max_examples=800, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(raw=hostile_files())
def test_snapshot_keys_list_and_check_read_every_file_as_yaml_does(raw, tmp_path):
    assert_read_as_yaml_reads_it(raw, tmp_path)


def test_the_key_cache_keeps_the_counts_of_the_key_objects_it_drops(monkeypatch):
    """Accepted lines are counted on the cached key objects; a cache that fills up
    drops them, but not what they counted (the device table's)."""
    from amproxy import authsnapshot
    from amproxy.auth import AuthKey
    monkeypatch.setattr(authsnapshot, "MAX_CACHED_KEYS", 2)
    cache = authsnapshot.KeyCache(lambda public_key: AuthKey(public_key.decode(), "s", ["m"]),
                                  lambda public_key: True)
    cache[b"a"].accepted += 3
    cache[b"b"].accepted += 1
    cache[b"c"].accepted += 2  # a full cache: a and b are dropped
    cache[b"a"].accepted += 1
    assert cache.take_counts() == {b"a": 4, b"b": 1, b"c": 2}
    assert cache.take_counts() == {}


def test_asking_whether_a_key_exists_builds_no_key_object(tmp_path, monkeypatch):
    """A worker's record asks of each connection's key once a second: with more
    connections than the cache holds, building keys for it emptied the cache."""
    from amproxy import authsnapshot
    monkeypatch.setattr(authsnapshot, "MAX_CACHED_KEYS", 2)
    snapshot = snapshot_of(b"apikeys:\n" + b"".join(
        b"  k%d:\n    secret_key: s%d\n    metrics:\n      - m.%d\n" % (i, i, i)
        for i in range(5)), tmp_path)
    keys = snapshot.keys
    keys[b"k0"].accepted += 1  # a line's key, cached
    assert all(b"k%d" % i in keys for i in range(5)) and b"k9" not in keys
    assert b"k0" in keys and list(keys) == [b"k0"]  # no key built, none dropped
    assert keys.take_counts() == {b"k0": 1}
