import logging
import os

import pytest

from amproxy.auth import AuthFile, load_auth_file
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
