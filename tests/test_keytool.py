import os
import stat
import subprocess
import time

import pytest

from amproxy import keytool
from amproxy.auth import load_auth_file
from amproxy.errors import AuthFileError
from conftest import AMPROXY, line_for, wait_points

COMMENTED = """\
# devices at home
---
apikeys:
  # the living room
  alice:
    secret_key: alice-secret
    metrics:
      - home.alice.temp
  bob:
    secret_key: bob-secret
    metrics:
      - home.bob.*
"""


@pytest.fixture
def auth(tmp_path):
    path = tmp_path / "auth.yaml"
    path.write_text(COMMENTED)
    os.chmod(path, 0o640)
    return str(path)


def test_new_key_keeps_comments_layout_and_mode(auth):
    secret, kept = keytool.add_key(auth, "carol", ["home.carol.**", "exact.metric"])
    assert kept
    text = open(auth).read()
    assert text.startswith(COMMENTED)
    assert "  carol:\n    secret_key: %s\n    metrics:\n      - home.carol.**\n" % secret in text
    assert stat.S_IMODE(os.stat(auth).st_mode) == 0o640
    key = load_auth_file(auth).get(b"carol")
    assert key.allows(b"home.carol.x.y") and key.allows(b"exact.metric")
    assert key.signature(b"x") == keytool_signature(secret, b"x")
    assert len(secret) >= 43  # 32 random bytes in URL-safe base64


def keytool_signature(secret, text):
    from amproxy.protocol import Signer
    return Signer(secret).signature(text)


def test_secrets_are_random(auth):
    assert keytool.new_secret() != keytool.new_secret()


def test_duplicate_and_bad_input_are_refused(auth):
    before = open(auth).read()
    with pytest.raises(AuthFileError, match="already has a key 'alice'"):
        keytool.add_key(auth, "alice", ["x"])
    with pytest.raises(AuthFileError, match="bad metric pattern"):
        keytool.add_key(auth, "dave", ["a.[b"])
    with pytest.raises(AuthFileError, match="without spaces"):
        keytool.add_key(auth, "d ave", ["x"])
    assert open(auth).read() == before


def test_revoke_cuts_out_only_that_key(auth):
    assert keytool.revoke_key(auth, "alice")
    text = open(auth).read()
    assert "alice" not in text.replace("# the living room", "")
    assert "# devices at home" in text and "bob-secret" in text
    assert list(load_auth_file(auth).keys) == [b"bob"]
    with pytest.raises(AuthFileError, match="has no key 'alice'"):
        keytool.revoke_key(auth, "alice")


def test_unusual_layout_is_rewritten_from_its_data(tmp_path):
    path = tmp_path / "auth.yaml"
    path.write_text('apikeys: {"k": {"secret_key": "s", "metrics": ["a", "b"]}}\n')
    secret, kept = keytool.add_key(str(path), "new", ["c.*"])
    assert not kept
    db = load_auth_file(str(path))
    assert db.get(b"k").allows(b"a") and db.get(b"new").allows(b"c.d")


def test_new_file_is_created_private(tmp_path):
    path = str(tmp_path / "fresh.yaml")
    keytool.add_key(path, "first", ["m"])
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert load_auth_file(path).get(b"first").allows(b"m")


def run(*args):
    return subprocess.run([AMPROXY] + list(args), capture_output=True, text=True, timeout=30)


def test_cli_keys_new_list_revoke_and_check(auth):
    result = run("keys", "new", "erin", "--metric", "erin.*", "--auth-file", auth)
    assert result.returncode == 0, result.stderr
    secret = result.stdout.strip()
    assert len(secret) >= 43 and "\n" not in secret
    listing = run("keys", "list", "--auth-file", auth)
    assert listing.returncode == 0
    assert "erin\terin.*" in listing.stdout and "alice\thome.alice.temp" in listing.stdout
    assert secret not in listing.stdout and "alice-secret" not in listing.stdout
    assert run("keys", "new", "erin", "--metric", "x", "--auth-file", auth).returncode == 1
    assert run("keys", "revoke", "erin", "--auth-file", auth).returncode == 0
    check = run("auth-file", "check", auth)
    assert check.returncode == 0
    assert "2 keys, 1 exact metric names, 1 patterns" in check.stdout
    assert "alice-secret" not in check.stdout + check.stderr


def test_cli_check_warns_about_names_no_line_can_pass(tmp_path):
    path = tmp_path / "names.yaml"
    path.write_text("apikeys:\n  k:\n    secret_key: s\n    metrics:\n"
                    "      - good.name\n      - bad..name\n      - bad/name\n"
                    "      - tagged;a=b\n      - pat.*\n")
    result = run("auth-file", "check", str(path))
    assert result.returncode == 0, result.stderr
    warned = [line for line in result.stderr.splitlines() if "can never be written" in line]
    assert len(warned) == 3, result.stderr
    for name in ("bad..name", "bad/name", "tagged;a=b"):
        assert any(name in line for line in warned), (name, warned)


def test_cli_check_fails_on_a_bad_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("apikeys:\n  k:\n    metrics: [a]\n")
    result = run("auth-file", "check", str(bad))
    assert result.returncode == 1
    assert "key 'k' has no secret_key" in result.stderr
    assert run("auth-file", "check", str(tmp_path / "missing.yaml")).returncode == 1


def test_running_server_picks_up_new_and_revoked_keys(carbon, auth_file, make_proxy):
    proxy = make_proxy(carbon.address, auth_file)
    result = run("keys", "new", "frank", "--metric", "e2e.frank.*", "--auth-file",
                 str(auth_file))
    assert result.returncode == 0, result.stderr
    keys = {"frank": (result.stdout.strip(), [])}
    ts = int(time.time()) - 20
    proxy.wait_log(r"auth file reloaded", count=2)
    proxy.send(line_for(keys, "frank", "e2e.frank.temp", 7, ts))
    wait_points(carbon, "e2e.frank.temp", {ts: 7.0}, ts)
    assert run("keys", "revoke", "frank", "--auth-file", str(auth_file)).returncode == 0
    proxy.wait_log(r"auth file reloaded", count=4)
    proxy.send(line_for(keys, "frank", "e2e.frank.temp", 8, ts + 1))
    proxy.wait_log(r"reason=unknownKey.*public_key=f\.\.\. public_key_length=5")


def test_rotate_keeps_the_old_secret_as_previous_for_the_grace_period(auth):
    before = time.time()
    secret, kept = keytool.rotate_key(auth, "alice", 3 * 86400, before)
    assert kept
    text = open(auth).read()
    assert "# the living room" in text and "home.bob.*" in text
    key = load_auth_file(auth).keys[b"alice"]
    assert key.entry()[0] == secret and key.entry()[2] == "alice-secret"
    assert key.previous_until == int(before + 3 * 86400)
    assert load_auth_file(auth).keys[b"bob"].previous_until == 0
    assert oct(os.stat(auth).st_mode & 0o777) == "0o640"
    # Rotating again: the secret just replaced becomes previous; the older one goes.
    newer, _ = keytool.rotate_key(auth, "alice", 60, before)
    key = load_auth_file(auth).keys[b"alice"]
    assert (key.entry()[0], key.entry()[2]) == (newer, secret)
    assert "alice-secret" not in open(auth).read()
    with pytest.raises(AuthFileError, match="has no key 'carol'"):
        keytool.rotate_key(auth, "carol", 60, before)


def test_cli_rotate_list_and_check_show_the_rotation_never_the_secrets(auth):
    result = run("keys", "rotate", "alice", "--grace", "2d", "--auth-file", auth)
    assert result.returncode == 0, result.stderr
    secret = result.stdout.strip()
    assert len(secret) >= 43 and "\n" not in secret
    assert "the old secret passes until 20" in result.stderr
    listing = run("keys", "list", "--auth-file", auth)
    assert "alice\thome.alice.temp\t(rotating: the previous secret passes until 20" \
        in listing.stdout
    assert secret not in listing.stdout and "alice-secret" not in listing.stdout
    rotated = run("keys", "rotate", "bob", "--grace", "0s", "--auth-file", auth)
    assert "the old secret no longer passes" in rotated.stderr
    assert "previous_secret" not in open(auth).read().split("bob:")[1]  # nothing to keep
    with open(auth, "a") as f:  # a rotation whose grace period is over
        f.write("  carol:\n    secret_key: carol-secret\n    previous_secret_key: old-carol\n"
                "    previous_secret_expires: 2020-01-01T00:00:00Z\n    metrics:\n"
                "      - home.carol\n")
    check = run("auth-file", "check", auth)
    assert check.returncode == 0
    assert "key 'carol': its previous secret expired" in check.stderr
    assert "old-carol" not in check.stdout + check.stderr
    assert "bob-secret" not in check.stdout + check.stderr
    assert "alice-secret" not in check.stdout + check.stderr


def test_a_running_server_takes_both_secrets_during_a_rotation(carbon, auth_file, make_proxy):
    result = run("keys", "new", "gina", "--metric", "e2e.gina.*", "--auth-file",
                 str(auth_file))
    old = result.stdout.strip()
    rotated = run("keys", "rotate", "gina", "--grace", "1h", "--auth-file", str(auth_file))
    assert rotated.returncode == 0, rotated.stderr
    new = rotated.stdout.strip()
    proxy = make_proxy(carbon.address, auth_file)
    ts = int(time.time()) - 30
    proxy.send(line_for({"gina": (old, [])}, "gina", "e2e.gina.temp", 1, ts)
               + line_for({"gina": (new, [])}, "gina", "e2e.gina.temp", 2, ts + 1)
               + line_for({"gina": ("a-third-secret", [])}, "gina", "e2e.gina.temp", 3, ts + 2))
    wait_points(carbon, "e2e.gina.temp", {ts: 1.0, ts + 1: 2.0}, ts)
    proxy.wait_log(r"reason=badSignature")


def test_rotating_again_says_which_previous_secret_stops_passing(auth):
    assert run("keys", "rotate", "alice", "--grace", "2d", "--auth-file", auth).returncode == 0
    again = run("keys", "rotate", "alice", "--grace", "2d", "--auth-file", auth)
    assert again.returncode == 0
    assert "key 'alice': its previous secret, valid until 20" in again.stderr
    too_long = run("keys", "rotate", "alice", "--grace", "100000000d", "--auth-file", auth)
    assert too_long.returncode == 1 and "--grace must be between 0 and 3650 days" in too_long.stderr
    assert "Traceback" not in too_long.stderr


def test_a_far_future_expiry_is_listed_not_a_traceback(tmp_path):
    path = tmp_path / "far.yaml"
    path.write_text("apikeys:\n  k:\n    secret_key: s\n    previous_secret_key: p\n"
                    "    previous_secret_expires: 9999-12-31T23:59:59-01:00\n    metrics: [a]\n")
    listing = run("keys", "list", "--auth-file", str(path))
    assert listing.returncode == 0, listing.stderr
    assert "passes until 9999-12-31T23:59:59Z" in listing.stdout


def test_many_edits_of_a_standard_file_keep_it_standard_and_as_yaml_reads_it(tmp_path):
    """Each edit changes one key's lines and nothing else: the file stays in the
    standard layout (read in place), comments stay, and YAML reads what was meant."""
    import random
    import yaml
    from amproxy.auth import parse_auth_data
    from amproxy.authscan import scan
    path = tmp_path / "fleet.yaml"
    path.write_text("# the fleet\napikeys:\n" + "".join(
        "  # device %d\n  dev%d:\n    secret_key: s-%d\n    metrics:\n      - f.dev%d.t\n"
        % (i, i, i, i) for i in range(300)))
    model = {"dev%d" % i: ("s-%d" % i, {"f.dev%d.t" % i}, None) for i in range(300)}
    rng = random.Random(13)
    for step in range(60):
        name = rng.choice(sorted(model))
        action = rng.choice(["new", "revoke", "rotate"])
        if action == "new":
            name = "added%d" % step
            metrics = ["a.%d" % step, "b.{x,y}.*", "*.q%d" % step]  # the last one quoted
            secret, kept = keytool.add_key(str(path), name, metrics)
            model[name] = (secret, set(metrics), None)
        elif action == "revoke":
            assert keytool.revoke_key(str(path), name)
            del model[name]
            kept = True
        else:
            old = model[name][0]
            secret, kept = keytool.rotate_key(str(path), name, 3600, 1796461200)
            model[name] = (secret, model[name][1], old)
        assert kept
        raw = path.read_bytes()
        assert scan(raw, str(path)) is not None, "no longer the standard layout"
        db = parse_auth_data(yaml.load(raw, Loader=yaml.BaseLoader), str(path))
        got = {n.decode(): (k.entry()[0], set(k.entry()[1]), k.entry()[2])
               for n, k in db.keys.items()}
        assert got == model
    text = path.read_text()
    assert text.startswith("# the fleet\napikeys:\n")
    assert all("# device %d\n" % i in text for i in range(300))
    assert not [f for f in os.listdir(tmp_path) if f != "fleet.yaml"]  # no temp file left


def test_keys_edits_at_the_same_time_all_land(auth):
    """Without a lock, both read the same file and the last rename drops the other's key."""
    children = [subprocess.Popen([AMPROXY, "keys", "new", "racer%d" % i, "--metric", "r.%d" % i,
                                  "--auth-file", auth], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE) for i in range(6)]
    for child in children:
        child.communicate(timeout=60)
        assert child.returncode == 0
    children = [subprocess.Popen([AMPROXY, "keys", cmd, name, "--auth-file", auth],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                for cmd, name in [("revoke", "racer0"), ("rotate", "racer1"),
                                  ("revoke", "racer2"), ("rotate", "racer3")]]
    for child in children:
        child.communicate(timeout=60)
        assert child.returncode == 0
    assert sorted(load_auth_file(auth).keys) == [b"alice", b"bob", b"racer1", b"racer3",
                                                 b"racer4", b"racer5"]


def test_keys_list_into_a_closed_pipe_is_quiet(auth):
    for i in range(3):
        keytool.add_key(auth, "many%d" % i, ["m.%d" % i])
    result = subprocess.run("%s keys list --auth-file %s | head -1" % (AMPROXY, auth),
                            shell=True, capture_output=True, text=True, timeout=30)
    assert result.stdout.count("\n") == 1 and "Traceback" not in result.stderr
