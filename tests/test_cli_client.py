"""The one-shot client commands, run as an operator or a cron job would."""

import subprocess

import pytest

from conftest import AMPROXY, free_port


def amproxy(*args, env=None):
    return subprocess.run([AMPROXY, *args], env=env, capture_output=True, text=True,
                          timeout=30)


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
