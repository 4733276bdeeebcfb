"""The one-shot commands, run as an operator or a cron job would."""

import os
import re
import subprocess

import pytest

from conftest import AMPROXY, free_port


def amproxy(*args, env=None):
    return subprocess.run([AMPROXY, *args], env=env, capture_output=True, text=True,
                          timeout=30)


def run_cli(*args, env=None):
    """As an operator would, but never reading this host's /etc/amproxy/amproxy.conf."""
    clean = {k: v for k, v in os.environ.items()
             if k not in ("AUTH_FILE", "AMPROXY_STATS_SOCKET", "AMPROXY_PIDFILE")}
    clean["AMPROXY_CONFIG"] = "/dev/null"
    return amproxy(*args, env=dict(clean, **(env or {})))


@pytest.mark.parametrize("text", [
    "a 1 1764201600",                 # 3 fields
    "a 1 1764201600 k extra",         # 5 fields: a whole wire line, say
    "a 1 now k",                      # timestamp not a number
    "a 1 1764201600.5 k",             # nor a fraction
    "a 1 -1764201600 k",              # nor signed
    "a 1 \u0661\u0667\u0666\u0664 k",  # digits, but not ASCII ones
    "a  1 1764201600 k",              # double space: an empty field
    " a 1 1764201600 k",              # leading space: an empty metric
    "",
])
def test_cli_signature_refuses_text_that_is_not_a_signed_text(text):
    result = amproxy("client", "signature", text,
                     env={"KEY_PRIVATE": "s", "LANG": "C.UTF-8"})
    assert result.returncode == 1
    assert result.stdout == ""
    error = result.stderr.strip()
    assert error.startswith("amproxy: error: ") and "\n" not in error
    assert "metric value timestamp public_key" in error


def test_cli_send_to_an_unreachable_server_fails_and_says_the_point_is_lost():
    address = "127.0.0.1:%d" % free_port()  # bound, read and closed: nothing listens
    result = amproxy("client", "send", "m", "1", "--server-addr", address,
                     "--key-public", "k", "--key-private", "s")
    assert result.returncode == 1
    assert result.stderr == ("amproxy: error: cannot reach amproxy at %s: Connection "
                             "refused; the point was not sent\n" % address)


@pytest.mark.parametrize("argv", [["server", "--help"], ["keys", "--help"], ["client", "--help"],
                                  ["auth-file", "--help"], ["stats", "--help"],
                                  ["keys", "new", "--help"], ["client", "send", "--help"],
                                  ["--help"]])
def test_every_command_has_its_own_help(argv):
    result = run_cli(*argv)
    assert result.returncode == 0, result.stderr
    assert "usage: amproxy %s" % " ".join(w for w in argv if w != "--help") in result.stdout
    text = " ".join(result.stdout.split())  # as one line, whatever the wrapping
    assert "goo.gl" not in text and "stuff=[a,b,c]" not in text
    assert "(default: )" not in text
    assert not re.search(r"\(default: [^)]*\) \(default:", text), "a doubled default"


@pytest.mark.parametrize("argv, named", [(["frobnicate"], "'frobnicate'"),
                                         (["keys", "frob"], "'keys frob'")])
def test_an_unknown_command_is_named(argv, named):
    result = run_cli(*argv)
    assert result.returncode == 2
    assert named in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_keys_and_check_use_the_servers_auth_file(tmp_path):
    auth = tmp_path / "keys.yaml"
    auth.write_text("apikeys:\n  dev:\n    secret_key: s\n    metrics: [a.b]\n")
    conf = tmp_path / "amproxy.conf"
    conf.write_text("auth-file = %s\naddr = 127.0.0.1:1\n" % auth)
    listing = run_cli("keys", "list", "--config", str(conf))
    assert listing.returncode == 0 and "dev\ta.b" in listing.stdout, listing.stderr
    check = run_cli("auth-file", "check", "--config", str(conf))
    assert check.returncode == 0 and str(auth) in check.stdout, check.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("apikeys: [\n")
    env_check = run_cli("auth-file", "check", env={"AUTH_FILE": str(bad)})
    assert env_check.returncode == 1 and str(bad) in env_check.stderr


def test_a_bad_config_file_at_start_is_one_line_naming_it(tmp_path):
    conf = tmp_path / "amproxy.conf"
    conf.write_text("workers = two\n")
    result = run_cli("server", "--config", str(conf))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and str(conf) in result.stderr, \
        result.stderr
