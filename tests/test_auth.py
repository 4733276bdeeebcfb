import copy
import logging
import os

import pytest

from amproxy.auth import load_auth_file
from amproxy.authsnapshot import AuthFile, SnapshotChannel
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
     ["'k'", "previous_secret_expires: 'next week' is not an RFC 3339 time"]),
    ("apikeys:\n  k:\n    secret_key: s\n    previous_secret_key: p\n"
     "    previous_secret_expires: 2026-12-05T10:00:00\n    metrics: [a]\n",
     ["'k'", "is not an RFC 3339 time"]),  # no offset: which time zone?
    ("apikeys:\n  k:\n    secret_key: s\n    max_rate: fast\n    metrics: [a]\n",
     ["'k'", "max_rate 'fast' is not a number of lines per second above 0"]),
    ("apikeys:\n  k:\n    secret_key: s\n    max_rate: 0\n    metrics: [a]\n",
     ["'k'", "max_rate '0'"]),
    ("apikeys:\n  k:\n    secret_key: s\n    max_rate: inf\n    metrics: [a]\n",
     ["'k'", "max_rate 'inf'"]),
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


LAYOUT_CASES = [
    GOOD,
    "---\n" + GOOD,
    "# keys\n---\napikeys:\n\n  # a device\n  k:\n      metrics:\n        - a.b\n        # c\n"
    "        - c-d_e/f\n      secret_key: s3cr3t+/=\n",
    "apikeys:\n  k:\n    secret_key: s\n    metrics:\n    - a\n    - b\n  j:\n"
    "    secret_key: t\n    metrics: []\n",
    "apikeys:\n    k:\n        secret_key: s\n        metrics:\n            - a\n",
    "apikeys:\n  k:\n    secret_key: s\n    previous_secret_key: p\n"
    "    previous_secret_expires: 2026-12-05T10:00:00+01:00\n    max_rate: 2.5\n"
    "    metrics:\n    - a\n",
    # Everything below is outside the fast layout, so YAML must parse it.
    "apikeys:\n  k:\n    secret_key: 's p'\n    metrics: [a, b]\n",
    "apikeys:\n  k:\n    secret_key: s # comment\n    metrics:\n    - a\n",
    "apikeys:\n  k:\n    secret_key: s\n    metrics:\n    - a # not a metric name\n",
    "apikeys:\n  k: &x\n    secret_key: s\n    metrics: []\n  j: *x\n",
    "apikeys:\n  \"quoted\":\n    secret_key: s\n    metrics:\n    - \"a b\"\n",
    "apikeys:\n  k:\n    secret_key: >\n      folded\n    metrics: []\n",
    "apikeys:\n  k:\n    secret_key: s\n    metrics:\n    - a\n    extra: 1\n",
    "apikeys: {}\n",
]


@pytest.mark.parametrize("text", LAYOUT_CASES)
def test_fast_layout_parser_agrees_with_yaml(text):
    import yaml
    from amproxy.auth import parse_simple_layout
    fast = parse_simple_layout(text)
    if fast is not None:
        assert fast == yaml.load(text, Loader=yaml.BaseLoader)


def test_fast_layout_parser_takes_the_usual_layouts():
    from amproxy.auth import parse_simple_layout
    assert all(parse_simple_layout(text) is not None for text in LAYOUT_CASES[:6])
    assert all(parse_simple_layout(text) is None for text in LAYOUT_CASES[6:13])


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
