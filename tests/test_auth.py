import copy
import logging
import os
import time

import pytest

from amproxy.auth import load_auth_file
from amproxy.authsnapshot import AuthFile
from amproxy.links import SnapshotChannel
from amproxy.protocol import Signer
from amproxy.errors import AuthFileError

GOOD = """\
apikeys:
  my_public_key:
    secret_key: my_secret_key
    metrics:
    - metric1
    - metric2
  12345:
    secret_key: 987
    metrics: []
"""


def write(path, text):
    path.write_text(text)
    return str(path)


def test_loads_keys_and_metrics(tmp_path):
    db = load_auth_file(write(tmp_path / "a.yaml", GOOD))
    assert len(db) == 2
    key = db.get(b"my_public_key")
    assert key.allows(b"metric1") and key.allows(b"metric2")
    assert not key.allows(b"metric3")
    assert db.get(b"12345") is not None  # YAML numbers as key names are fine
    assert db.metric_count == 2


@pytest.mark.parametrize("text, words", [
    ("apikeys: [", ["not valid YAML", "line"]),
    ("- a\n- b\n", ["mapping named 'apikeys'"]),
    ("apikeys:\n  k:\n    metrics: [a]\n", ["'k'", "no secret_key"]),
    ("apikeys:\n  k:\n    secret_key: ''\n    metrics: [a]\n", ["'k'", "no secret_key"]),
    ("apikeys:\n  k:\n    secret_key: s\n", ["'k'", "metrics must be a list"]),
    ("apikeys:\n  k:\n    secret_key: s\n    metrics: a.b\n", ["'k'", "metrics must be a list"]),
    ("apikeys:\n  k:\n    secret_key: s\n    metrics: [[a]]\n", ["'k'", "metric ['a']"]),
    ("apikeys:\n  k:\n    secret_key: s\n    metrics: ['a b']\n", ["'k'", "'a b'"]),
    ("apikeys:\n  'a b':\n    secret_key: s\n    metrics: [a]\n", ["'a b'", "without spaces"]),
    ("apikeys:\n  k: hello\n", ["'k'", "must be a mapping"]),
    ("apikeys:\n  k:\n    secret_key: s\n    previous_secret_key: p\n    metrics: [a]\n",
     ["'k'", "both previous_secret_key and previous_secret_expires"]),
    ("apikeys:\n  k:\n    secret_key: s\n    previous_secret_expires: 2026-12-05T10:00:00Z\n"
     "    metrics: [a]\n", ["'k'", "both previous_secret_key"]),
    ("apikeys:\n  k:\n    secret_key: s\n    previous_secret_key: p\n"
     "    previous_secret_expires: next week\n    metrics: [a]\n",
     ["'k'", "previous_secret_expires is not an RFC 3339 time"]),
    ("apikeys:\n  k:\n    secret_key: s\n    previous_secret_key: p\n"
     "    previous_secret_expires: 2026-12-05T10:00:00\n    metrics: [a]\n",
     ["'k'", "is not an RFC 3339 time"]),  # no offset: which time zone?
    ("apikeys:\n  k:\n    secret_key: s\n    max_rate: fast\n    metrics: [a]\n",
     ["'k'", "max_rate is not a number of lines per second above 0"]),
    ("apikeys:\n  k:\n    secret_key: s\n    max_rate: 0\n    metrics: [a]\n",
     ["'k'", "max_rate is not"]),
    ("apikeys:\n  k:\n    secret_key: s\n    max_rate: inf\n    metrics: [a]\n",
     ["'k'", "max_rate is not"]),
])
def test_invalid_files_name_the_file_and_key(tmp_path, text, words):
    path = write(tmp_path / "bad.yaml", text)
    with pytest.raises(AuthFileError) as err:
        load_auth_file(path)
    message = str(err.value)
    assert path in message
    for word in words:
        assert word in message


def test_missing_file(tmp_path):
    with pytest.raises(AuthFileError, match="cannot read auth file .*nope.yaml"):
        load_auth_file(str(tmp_path / "nope.yaml"))


def test_errors_never_contain_secrets(tmp_path):
    path = write(tmp_path / "a.yaml", "apikeys:\n  k:\n    secret_key: hunter2\n    metrics: 5\n")
    with pytest.raises(AuthFileError) as err:
        load_auth_file(path)
    assert "hunter2" not in str(err.value)


def test_reload_notices_in_place_rewrite_and_rename(tmp_path):
    path = tmp_path / "a.yaml"
    auth = AuthFile(write(path, GOOD))
    auth.load()
    assert not auth.changed()
    # In-place rewrite with the same size: the mtime (ns) still differs.
    os.utime(path, ns=(1, 1))
    assert auth.changed()
    assert auth.reload_if_changed()
    assert not auth.changed()
    # Atomic rename of a new file.
    new = tmp_path / "new.yaml"
    write(new, GOOD.replace("metric2", "metric9"))
    os.utime(new, ns=(1, 1))  # same mtime as before: the inode tells
    os.rename(new, path)
    assert auth.reload_if_changed()
    assert auth.db.get(b"my_public_key").allows(b"metric9")
    assert auth.reloads == 2


def test_bad_reload_keeps_previous_keys(tmp_path, caplog):
    path = tmp_path / "a.yaml"
    auth = AuthFile(write(path, GOOD))
    auth.load()
    write(path, "apikeys: {broken")
    with caplog.at_level(logging.ERROR):
        assert not auth.reload("test")
    assert auth.db.get(b"my_public_key") is not None
    assert auth.reload_errors == 1
    assert "keeping the 2 keys" in caplog.text
    assert "my_secret_key" not in caplog.text


def test_deleted_file_keeps_previous_keys(tmp_path):
    path = tmp_path / "a.yaml"
    auth = AuthFile(write(path, GOOD))
    auth.load()
    os.unlink(path)
    assert auth.changed()
    assert not auth.reload_if_changed()
    assert len(auth.db) == 2


def test_scalars_are_read_as_written(tmp_path):
    db = load_auth_file(write(tmp_path / "a.yaml", "apikeys:\n  '007':\n    secret_key: 0x1F\n"
                              "    metrics: [yes, 1.50, null]\n"))
    key = db.get(b"007")
    assert key.signature(b"x") == Signer("0x1F").signature(b"x")
    assert key.metrics == {b"yes", b"1.50", b"null"}


def test_an_update_sent_to_a_worker_swaps_in_the_new_keys(tmp_path, caplog):
    path = tmp_path / "a.yaml"
    master = AuthFile(write(path, GOOD))
    master.load()
    worker = copy.copy(master)  # as the fork leaves it
    channel = SnapshotChannel()
    write(path, GOOD.replace("metric2", "metric7"))
    update = master.compile("test")
    channel.send(update)
    master.take(update, quiet=True)
    old = worker.db
    with caplog.at_level(logging.INFO):
        [worker.take(update) for update in channel.receive()]
    assert worker.db is not old and master.db is not old
    assert worker.db.get(b"my_public_key").allows(b"metric7")
    assert not old.get(b"my_public_key").allows(b"metric7")
    assert (worker.reloads, master.reloads) == (1, 0)
    assert "auth file reloaded" in caplog.text and "metric7" not in caplog.text
    write(path, "apikeys: [")
    channel.send(master.compile("test"))
    with caplog.at_level(logging.INFO):
        [worker.take(update) for update in channel.receive()]
    assert worker.reload_errors == 1 and worker.db.get(b"my_public_key") is not None
    assert "is not valid YAML at line 2; keeping the 2 keys loaded before" in caplog.text


def test_a_key_in_rotation_has_its_previous_secret_until_the_time_given(tmp_path):
    path = write(tmp_path / "auth.yaml", "apikeys:\n  k:\n    secret_key: new\n"
                 "    previous_secret_key: old\n"
                 "    previous_secret_expires: 2026-12-05T10:00:00+01:00\n"
                 "    metrics:\n    - a\n")
    key = load_auth_file(path).keys[b"k"]
    assert key.previous_until == 1796461200  # 09:00 UTC
    assert key.previous.signature(b"x") == Signer("old").signature(b"x")
    assert load_auth_file(write(tmp_path / "plain.yaml", GOOD)).keys[
        b"my_public_key"].previous_until == 0


def test_max_rate_is_read_per_key(tmp_path):
    path = write(tmp_path / "auth.yaml", "apikeys:\n  k:\n    secret_key: s\n    max_rate: 2.5\n"
                 "    metrics: [a]\n  j:\n    secret_key: t\n    metrics: [a]\n")
    db = load_auth_file(path)
    assert (db.keys[b"k"].max_rate, db.keys[b"j"].max_rate) == (2.5, 0.0)
    assert db.rate_limited
    assert not load_auth_file(write(tmp_path / "plain.yaml", GOOD)).rate_limited


# -- issue 21: bounds, secrets in messages, duplicates, shared secrets, a file that
# changes while it is read ------------------------------------------------------------

def test_aliases_may_not_make_a_file_much_larger_than_it_is(tmp_path):
    """Finding 8: one long name listed 2,000 times through an alias."""
    big = "home." + "x" * 8000
    text = "apikeys:\n  k0:\n    secret_key: s0\n    metrics: [&big %s]\n" % big + "".join(
        "  k%d:\n    secret_key: s%d\n    metrics: [*big]\n" % (i, i) for i in range(1, 2000))
    path = write(tmp_path / "bomb.yaml", text)
    with pytest.raises(AuthFileError, match="aliases .* more than 2 times its size"):
        load_auth_file(path)
    from amproxy import keytool
    with pytest.raises(AuthFileError, match="aliases"):
        keytool.check(path)
    # A few aliases that save typing are fine.
    small = ("apikeys:\n  a:\n    secret_key: s1\n    metrics: &m [home.a, home.b]\n"
             "  b:\n    secret_key: s2\n    metrics: *m\n")
    assert len(load_auth_file(write(tmp_path / "small.yaml", small))) == 2


@pytest.mark.parametrize("field, value", [
    ("metric", "home." + "x" * 16380), ("pattern", "home.*" + "x" * 16380),
    ("public key", "k" * 16385), ("secret_key", "s" * 16385)])
def test_names_patterns_and_secrets_longer_than_a_carbon_line_are_refused(tmp_path, field,
                                                                          value):
    name, secret, metric = "k", "s", "home.t"
    if field == "public key":
        name = value
    elif field == "secret_key":
        secret = value
    else:
        metric = value
    # YAML takes a key longer than 1024 characters only in the explicit form (? key).
    for text in ("apikeys:\n  ? %s\n  :\n    secret_key: %s\n    metrics:\n    - %s\n",
                 "apikeys:\n  ? '%s'\n  : {secret_key: '%s', metrics: ['%s']}\n"):
        path = write(tmp_path / "long.yaml", text % (name, secret, metric))
        with pytest.raises(AuthFileError, match="longer than 16384 bytes") as err:
            load_auth_file(path)
        assert len(str(err.value)) < 300


SECRET = "Zq8-hunter2-9fKp"


@pytest.mark.parametrize("text", [
    # A secret in max_rate's place, and the previous secret's two fields swapped.
    "apikeys:\n  k:\n    secret_key: s\n    max_rate: %s\n    metrics: [a]\n" % SECRET,
    "apikeys:\n  k:\n    secret_key: s\n    previous_secret_key: 2026-12-05T10:00:00Z\n"
    "    previous_secret_expires: %s\n    metrics: [a]\n" % SECRET,
    "apikeys:\n  k:\n    secret_key: s\n    previous_secret_key: p\n"
    "    previous_secret_expires: [%s]\n    metrics: [a]\n" % SECRET,
])
def test_no_message_quotes_what_may_be_a_secret(tmp_path, text, caplog):
    """Finding 9: at start and reload (the same message) and in auth-file check."""
    from amproxy import keytool
    from amproxy.authsnapshot import compile_snapshot
    path = write(tmp_path / "a.yaml", text)
    with pytest.raises(AuthFileError) as err:
        load_auth_file(path)
    refused = compile_snapshot(path)
    with pytest.raises(AuthFileError) as checked:
        keytool.check(path)
    for message in (str(err.value), refused.error, str(checked.value), caplog.text):
        assert SECRET not in message and path in message + path


@pytest.mark.parametrize("text, lines", [
    ("apikeys:\n  alice:\n    secret_key: s1\n    metrics: []\n"
     "  alice:\n    secret_key: s2\n    metrics: [home.bob.temp]\n", (2, 5)),
    ("apikeys:\n  alice:\n    secret_key: s1\n    metrics: []\n    secret_key: s2\n", (3, 5)),
    ("apikeys: {alice: {secret_key: s1, metrics: []}, alice: {secret_key: s2, metrics: []}}\n",
     (1, 1)),
])
def test_a_key_given_twice_is_an_error_that_names_both_lines(tmp_path, text, lines):
    """Finding 10: "the last one wins" was silent; check called the file valid."""
    from amproxy import keytool
    path = write(tmp_path / "dup.yaml", text)
    for load in (load_auth_file, keytool.check):
        with pytest.raises(AuthFileError) as err:
            load(path)
        assert "is given twice in one mapping (lines %d and %d)" % lines in str(err.value)
        assert path in str(err.value) and "s1" not in str(err.value)


def test_a_secret_two_keys_share_is_a_warning_at_load_and_in_check(tmp_path, caplog):
    """Finding 10: bob's device could sign as alice while alice's previous secret is bob's."""
    from amproxy import keytool
    from amproxy.authsnapshot import write_snapshot  # as the compiling child does
    standard = ("apikeys:\n  alice:\n    secret_key: alice-new\n"
                "    previous_secret_key: bob-secret\n"
                "    previous_secret_expires: 2099-01-01T00:00:00Z\n    metrics:\n"
                "    - home.alice.temp\n  bob:\n    secret_key: bob-secret\n    metrics:\n"
                "    - home.bob.temp\n  carol:\n    secret_key: alice-new\n    metrics: []\n")
    other = standard.replace("alice:\n", "'alice':\n")  # read by YAML, not in place
    for text in (standard, other):
        path = write(tmp_path / "shared.yaml", text)
        caplog.clear()
        with caplog.at_level("WARNING"):
            fd = os.memfd_create("snapshot")
            write_snapshot(path, fd)
            os.close(fd)
            assert "is valid" in keytool.check(path)
        warnings = [r.getMessage() for r in caplog.records if "share a secret" in r.message]
        assert len(warnings) == 4, warnings  # two pairs, at load and in check
        assert "keys 'alice' and 'bob' share a secret" in warnings[0]
        assert "keys 'alice' and 'carol' share a secret" in warnings[1]
        assert "secret" not in caplog.text.replace("share a secret", "").replace(
            "_secret", "").replace("its own", "")  # no value


def test_a_file_that_changes_while_it_is_read_is_read_again(tmp_path, monkeypatch):
    """Finding 6: a reader that sees the file change under it reads again."""
    from amproxy import auth
    path = tmp_path / "auth.yaml"
    whole = GOOD.encode()
    path.write_bytes(whole[:len(whole) // 2])  # the writer is half way
    reads = []

    def read_while_writing(f):
        data = f.read()
        if not reads:  # the writer finishes while the first read is under way
            with open(path, "r+b") as rest:
                rest.write(whole)
        reads.append(data)
        return data
    monkeypatch.setattr(auth, "_read_all", read_while_writing)
    assert auth.read_auth_file(str(path)) == whole
    assert len(reads) == 2

    def never_still(f):
        data = f.read()
        os.utime(path, ns=(0, time.time_ns() + len(reads)))
        reads.append(data)
        return data
    monkeypatch.setattr(auth, "_read_all", never_still)
    with pytest.raises(AuthFileError, match="kept changing while it was read"):
        auth.read_auth_file(str(path))


def test_a_change_is_taken_once_the_file_has_held_still_for_a_second(tmp_path):
    """Issue 21, finding 6: the poll's side (the master's AuthReloads asks this)."""
    path = tmp_path / "a.yaml"
    auth = AuthFile(write(path, GOOD))
    auth.load()
    now = time.time()
    os.utime(path, ns=(0, int(now * 1e9)))  # written just now, in place
    assert not auth.settled_change(1000.0) and auth.settling
    assert not auth.settled_change(1000.9)
    assert auth.settled_change(1001.0)  # unchanged for a second, as seen here
    os.utime(path, ns=(0, int((now + 0.5) * 1e9)))  # written again: wait again
    assert not auth.settled_change(1001.1)
    os.utime(path, ns=(0, int((now - 5) * 1e9)))  # last written seconds ago: at once
    assert auth.settled_change(1001.2)
    auth.reload("file changed")
    # A new inode just written (install, or rm then write): it may be half-written too,
    # so it waits as well; one written a while ago is taken at once.
    new = tmp_path / "new.yaml"
    write(new, GOOD)
    os.rename(new, path)
    assert not auth.settled_change(2000.0)
    assert auth.settled_change(2001.0)
    write(new, GOOD)
    os.utime(new, ns=(0, int((time.time() - 5) * 1e9)))
    os.rename(new, path)
    assert auth.settled_change(2001.1)


def test_the_alias_bound_counts_bytes_and_deep_nesting_is_one_sentence(tmp_path):
    """Review of issue 21: aliases of 4-byte characters passed a bound in characters,
    and 600 nested lists gave `auth-file check` a traceback."""
    from amproxy import keytool
    emoji = "home." + "\U0001F600" * 4000
    text = "apikeys:\n  k0:\n    secret_key: s0\n    metrics: [&e '%s']\n" % emoji + "".join(
        "  k%d:\n    secret_key: s%d\n    metrics: [*e]\n" % (i, i) for i in range(1, 8))
    with pytest.raises(AuthFileError, match="aliases"):
        load_auth_file(write(tmp_path / "emoji.yaml", text))
    deep = write(tmp_path / "deep.yaml", "apikeys:\n  k:\n    secret_key: s\n    metrics: "
                 + "[" * 600 + "]" * 600 + "\n")
    for load in (load_auth_file, keytool.check):
        with pytest.raises(AuthFileError, match="nests lists or mappings hundreds deep"):
            load(deep)


def test_the_hot_paths_keys_have_no_getattr_hook(tmp_path):
    """With a __getattr__ on the class, CPython does not specialize filter_lines'
    attribute reads: 6% more instructions a line (callgrind)."""
    from amproxy.auth import AuthKey, LazyAuthKey
    from amproxy.authsnapshot import AuthSnapshot, write_snapshot
    assert not any("__getattr__" in vars(cls) for cls in AuthKey.__mro__)
    path = tmp_path / "auth.yaml"
    path.write_text("apikeys:\n  k:\n    secret_key: s\n    metrics:\n      - a.b\n")
    fd = os.memfd_create("test")
    try:
        write_snapshot(str(path), fd)
        snapshot = AuthSnapshot(fd)
    finally:
        os.close(fd)
    assert type(snapshot.keys[b"k"]) is AuthKey  # what the workers check lines with
    lazy = LazyAuthKey("k", "s", ["a.b", "bad name"])
    assert lazy.metrics == AuthKey("k", "s", ["a.b", "bad name"]).metrics == {b"a.b"}
