"""amproxy devices: the words that say why a device is silent, the orders, the
formats, the request line, and the command against a fake server on a Unix socket."""
import io
import json
import os
import socket
import subprocess
import threading
import time
from contextlib import redirect_stderr, redirect_stdout

import pytest

from amproxy import cli
from amproxy.devices import DeviceState
from amproxy.deviceview import (Query, format_age, format_time, parse_query, render,
                                render_json, render_table, request_line, sort_devices, summary,
                                why)

NOW = 1796300000.5           # 2026-12-03 12:13:20.5 UTC
STARTED = NOW - 3 * 86400 - 4 * 3600 - 17
HOUR = 3600


def device(key, **fields):
    """A device's state: never seen unless ``fields`` say otherwise."""
    return DeviceState(key, **fields)


def table(*devices, silent_after=HOUR, order="key"):
    return render_table(list(devices), NOW, STARTED, silent_after, order)


def rejected(key, reason, since, **fields):
    """A key whose lines since ``since`` (seconds before NOW) were rejected for ``reason``."""
    base = dict(accepted=50, last_accepted=NOW - since - 60, last_rejected=NOW - 5,
                last_reason=reason, rejected_since=NOW - since, rejected={reason: 9},
                connected=True, address="203.0.113.7", listener="tls")
    base.update(fields)
    return device(key, **base)


def explain(d):
    return why(d, NOW, STARTED, HOUR)


# -- the words ---------------------------------------------------------------------

@pytest.mark.parametrize("seconds, text", [
    (0, "0s"), (45, "45s"), (59.9, "59s"), (60, "1m0s"), (432, "7m12s"), (3599, "59m59s"),
    (7200, "2h0m"), (7380, "2h3m"), (86399, "23h59m"), (3 * 86400 + 4 * 3600 + 5, "3d4h"),
    (-5, "0s")])
def test_ages_are_written_as_amproxys_durations(seconds, text):
    assert format_age(seconds) == text


def test_an_exact_span_drops_its_zero_second_unit():
    assert format_age(3600, exact=True) == "1h"
    assert format_age(5400, exact=True) == "1h30m"
    assert format_age(90, exact=True) == "1m30s"


def test_a_clock_ahead_says_by_how_much_and_since_when():
    since = NOW - 2 * HOUR
    d = rejected("s1", "skew", 2 * HOUR, skew=432)
    assert explain(d) == "clock 7m12s ahead since %s" % format_time(since)
    assert format_time(since) == "2026-12-03 10:13 UTC"


def test_a_clock_behind_says_behind():
    d = rejected("s1", "skew", 600, skew=-7200)
    assert explain(d) == "clock 2h0m behind since %s" % format_time(NOW - 600)


def test_the_previous_secret_after_the_rotations_grace_says_to_give_the_new_one():
    expired = NOW - 86400
    d = rejected("s1", "badSignature", 3 * HOUR, old_secret=True,
                 previous_secret_expires=expired)
    assert explain(d) == (
        "signs with its previous secret, which expired 2026-12-02 12:13 UTC: give the "
        "device its new secret (amproxy keys list shows the key's rotation)")


def test_a_wrong_secret_is_not_taken_for_an_old_one():
    d = rejected("s1", "badSignature", 3 * HOUR, previous_secret_expires=NOW - 86400)
    assert explain(d) == ("signature fails since %s: wrong secret, or the line is "
                          "altered on the way" % format_time(NOW - 3 * HOUR))


def test_a_key_never_seen_says_since_when_amproxy_runs():
    assert explain(device("s1")) == "never seen since amproxy started 3d4h ago"


def test_metrics_not_allowed_points_at_keys_list():
    d = rejected("s1", "metricNotAllowed", 60)
    assert explain(d) == ("sends metrics its key may not write since %s (amproxy keys "
                          "list shows what it may write)" % format_time(NOW - 60))


@pytest.mark.parametrize("reason, text", [
    ("rateLimited", "over its max_rate since "),
    ("replayed", "resends lines already accepted (a replay?) since "),
    ("badMetric", "sends metric names Carbon refuses since "),
    ("badValue", "sends values that are not numbers since "),
    ("malformed", "sends lines not in the wire format since "),
    ("lineTooLong", "sends lines longer than --max-line-length since ")])
def test_the_other_reasons(reason, text):
    assert explain(rejected("s1", reason, 60)) == text + format_time(NOW - 60)


def test_silent_but_connected_and_silent_and_gone():
    quiet = device("s1", accepted=10, last_accepted=NOW - 7380, connected=True,
                   address="203.0.113.7", listener="plain")
    assert explain(quiet) == "silent for 2h3m; connected but sending nothing"
    gone = quiet._replace(connected=False)
    assert explain(gone) == "silent for 2h3m; not connected"


def test_a_device_that_is_fine_has_no_words():
    fine = device("s1", accepted=10, last_accepted=NOW - 30, connected=True)
    assert explain(fine) == ""
    # Rejected, accepted since, the rejection older than the window: fine again.
    assert explain(fine._replace(last_rejected=NOW - HOUR - 1, last_reason="skew",
                                 rejected={"skew": 1})) == ""


def test_a_failing_device_with_other_reasons_names_them_too():
    d = rejected("s1", "metricNotAllowed", 60, rejected={"metricNotAllowed": 2, "skew": 2,
                                                        "badSignature": 3})
    assert explain(d) == (
        "sends metrics its key may not write since %s (amproxy keys list shows what it may "
        "write); also rejected since amproxy started: the signature fails (wrong secret?) "
        "(3), its clock is off (2)" % format_time(NOW - 60))


def test_a_device_whose_lines_are_partly_rejected_says_so():
    """One allowed and one disallowed metric, or over its rate now and then: its lines
    are accepted, so it is not failing, but some are lost and the operator must know."""
    mixed = device("s1", accepted=10, last_accepted=NOW - 5, last_rejected=NOW - 125,
                   last_reason="metricNotAllowed", rejected={"metricNotAllowed": 3,
                                                             "skew": 1})
    assert explain(mixed) == ("4 lines rejected since amproxy started, the last 2m5s ago: "
                              "metrics its key may not write (3), its clock is off (1)")
    assert table(mixed).splitlines()[1].endswith("its clock is off (1)")
    once = mixed._replace(rejected={"rateLimited": 1}, last_reason="rateLimited")
    assert explain(once) == ("1 line rejected since amproxy started, the last 2m5s ago: "
                             "over its max_rate (1)")


def test_the_silence_window_is_the_querys_or_the_servers():
    d = device("s1", accepted=1, last_accepted=NOW - 2 * HOUR)
    assert "silent for 2h0m" in table(d)
    assert "silent for" not in table(d, silent_after=3 * HOUR)
    assert "silent for" not in render([d], Query(silent=3 * HOUR), NOW, STARTED, HOUR)
    assert "silent for 2h0m" in render([d], Query(), NOW, STARTED, HOUR)


def test_a_key_the_full_table_could_not_hold_says_so():
    assert explain(device("s1", tracked=False)).startswith(
        "not tracked: the device table is full")


# -- the table ---------------------------------------------------------------------

def test_the_table_is_aligned_and_ends_with_the_summary():
    text = table(
        device("a-long-key-name", accepted=1234, last_accepted=NOW - 192, connected=True,
               address="203.0.113.7", listener="tls"),
        device("b", accepted=5, last_accepted=NOW - 7380, address="198.51.100.2",
               listener="plain"),
        rejected("c", "skew", 2 * HOUR, skew=432),
        device("d"))
    lines = text.splitlines()
    assert lines[0].split() == ["KEY", "LAST", "ACCEPTED", "ACCEPTED", "CONNECTED", "WHY"]
    column = lines[0].index("LAST ACCEPTED")
    assert all(line[column - 2:column] == "  " for line in lines[1:5])
    assert lines[1].startswith("a-long-key-name  3m12s ago")
    assert "yes from 203.0.113.7 (tls)" in lines[1] and lines[1].endswith("(tls)")
    assert "no; last from 198.51.100.2 (plain)" in lines[2]
    assert lines[2].endswith("silent for 2h3m; not connected")
    assert lines[3].endswith("clock 7m12s ahead since 2026-12-03 10:13 UTC")
    assert "never" in lines[4] and lines[4].endswith("never seen since amproxy started "
                                                     "3d4h ago")
    counts = [line[lines[0].index("CONNECTED") - 2 - len("ACCEPTED"):
                   lines[0].index("CONNECTED") - 2] for line in lines[1:5]]
    assert counts == ["    1234", "       5", "      50", "       0"]  # right-aligned
    assert lines[-1] == "4 devices: 1 rejected only, 1 accepted within 1h, 1 silent, " \
        "1 never seen"
    assert not any(line.endswith(" ") for line in lines)


def test_the_summary_counts_each_device_once():
    devices = [device("ok", accepted=1, last_accepted=NOW - 10),
               rejected("recent", "rateLimited", 30)._replace(last_accepted=NOW - 40),
               rejected("stuck", "badSignature", 5 * HOUR),
               device("quiet", accepted=1, last_accepted=NOW - 5 * HOUR), device("never")]
    assert summary(devices, NOW, 1800) == \
        "5 devices: 2 rejected only, 1 accepted within 30m, 1 silent, 1 never seen"
    assert summary(devices[:1], NOW, HOUR) == \
        "1 device: 0 rejected only, 1 accepted within 1h, 0 silent, 0 never seen"
    assert summary([], NOW, HOUR) == "0 devices: 0 rejected only, 0 accepted within 1h, " \
        "0 silent, 0 never seen"


# -- orders and formats ------------------------------------------------------------

ORDERED = [
    device("e", accepted=9, last_accepted=NOW - 10, last_rejected=NOW - 5000,
           rejected={"skew": 1}),
    device("a", accepted=9, last_accepted=NOW - 9000),
    device("d"),
    device("c", accepted=9, last_accepted=NOW - 100, last_rejected=NOW - 20,
           rejected={"skew": 3, "replayed": 4}),
    device("b"),
]


@pytest.mark.parametrize("order, keys", [
    ("key", "abcde"),
    ("last-accepted", "bdace"),   # never first, then the longest silent
    ("last-rejected", "ceabd"),   # the latest rejection first, never rejected last
    ("rejected", "ceabd"),        # the most rejected lines first
])
def test_orders(order, keys):
    assert "".join(d.key for d in sort_devices(ORDERED, order)) == keys
    text = table(*ORDERED, order=order)
    assert "".join(line[0] for line in text.splitlines()[1:6]) == keys


def test_an_unknown_order_is_refused():
    with pytest.raises(ValueError):
        sort_devices(ORDERED, "age")


def test_json_is_the_sorted_device_list_as_one_document():
    text = render(ORDERED, Query(sort="last-accepted", output="json"), NOW, STARTED, HOUR)
    decoded = json.loads(text)
    assert isinstance(decoded, list)
    assert [d["key"] for d in decoded] == list("bdace")
    assert decoded[2] == ORDERED[1]._asdict()  # every field of the state
    assert text == render_json(ORDERED, "last-accepted")
    assert len(text.splitlines()) == 2 + len(ORDERED)  # one device a line
    assert json.loads(render_json([])) == []


@pytest.mark.parametrize("state", [
    DeviceState("plain"),
    DeviceState('q"uo\\te \u00e9\u2028\n}, {"key": x', 3, 1.5, 2.25, "skew", 3.0,
                {"skew": 2, "malformed": 1}, -5, True, 7.75, "2001:db8::1", "tls", True,
                False),
    rejected("r", "badSignature", 60, old_secret=True, previous_secret_expires=NOW),
])
def test_each_device_is_written_as_json_dumps_writes_its_fields(state):
    assert render_json([state]) == "[\n%s\n]\n" % json.dumps(state._asdict())


# -- the request -------------------------------------------------------------------

def test_the_request_line_and_its_parsing():
    assert request_line(Query()) == (b'devices {"key":null,"output":"table","rejected":false,'
                                     b'"silent":null,"sort":"key"}\n')
    line = request_line(Query(silent=3600.0, rejected=True, key="sensor1"))
    assert line.startswith(b"devices ") and line.endswith(b"\n") and line.count(b"\n") == 1
    assert b'"silent":3600,' in line  # whole seconds as an integer
    assert parse_query(line[8:]) == Query(3600, True, "sensor1")
    assert parse_query(request_line(Query(silent=1.5))[8:]).silent == 1.5
    assert request_line(Query(key="caf\u00e9 \n")).count(b"\n") == 1  # one line, any key
    assert parse_query(b"") == Query() == parse_query(b"{}")


@pytest.mark.parametrize("body, says", [
    (b"{not json", "not JSON"), (b"[1]", "an object"), (b'{"colour": 1}', "only the fields"),
    (b'{"silent": "1h"}', "silent must be seconds"), (b'{"silent": -1}', "silent must be"),
    (b'{"silent": true}', "silent must be"), (b'{"rejected": 1}', "rejected must be"),
    (b'{"key": 7}', "key must be a string"), (b'{"sort": "age"}', "sort must be one of"),
    (b'{"output": "xml"}', "output must be one of")])
def test_a_request_that_does_not_parse_is_refused_saying_why(body, says):
    with pytest.raises(ValueError, match=says):
        parse_query(body)


# -- the command against a fake server ----------------------------------------------

class FakeServer:
    """A Unix socket that reads one request (to the client's half-close) and answers."""

    def __init__(self, path, answer, read=True):
        """``answer``: bytes, or a list of bytes sent 0.3 s apart."""
        self.path, self.answer, self.read = path, answer, read
        self.requests = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(1)
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        conn, _ = self.sock.accept()
        with conn:
            conn.settimeout(5)
            if self.read:
                data = b""
                while True:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                self.requests.append(data)
            parts = self.answer if isinstance(self.answer, list) else [self.answer]
            for n, part in enumerate(parts):
                if n:
                    time.sleep(0.3)
                conn.sendall(part)

    def close(self):
        self.thread.join(5)
        self.sock.close()


def run(argv):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        status = cli.main(argv)
    return status, out.getvalue(), err.getvalue()


@pytest.fixture
def socket_path(tmp_path, monkeypatch):
    monkeypatch.setenv("AMPROXY_CONFIG", "/dev/null")
    monkeypatch.delenv("AMPROXY_STATS_SOCKET", raising=False)
    monkeypatch.delenv("AMPROXY_PIDFILE", raising=False)
    return str(tmp_path / "amproxy.stats.sock")


def answer(body, **header):
    """What the server's child sends: the header line, then the output it rendered."""
    fields = dict({"now": NOW, "started": STARTED, "silent_after": HOUR, "devices": 1,
                   "bytes": len(body.encode())}, **header)
    return json.dumps(fields).encode() + b"\n" + body.encode()


def test_a_body_that_comes_after_the_header_is_read_whole(socket_path):
    body = table(device("late"))
    server = FakeServer(socket_path, answer(body).split(b"\n", 1)[0] + b"\n",
                        read=True)
    server.answer = [server.answer, body.encode()[:10], body.encode()[10:]]
    status, out, err = run(["devices", "--stats-socket", socket_path])
    server.close()
    assert (status, out, err) == (0, body, "")


def test_an_answer_cut_short_is_an_error_not_a_partial_table(socket_path):
    body = table(device("cut"))
    server = FakeServer(socket_path, answer(body)[:-5])
    status, out, err = run(["devices", "--stats-socket", socket_path])
    server.close()
    assert (status, out) == (1, "")
    assert "ended early (%d of %d bytes)" % (len(body) - 5, len(body)) in err


def test_a_server_that_sends_nothing_is_said_so(socket_path):
    server = FakeServer(socket_path, b"")
    status, out, err = run(["devices", "--stats-socket", socket_path])
    server.close()
    assert (status, out) == (1, "")
    assert err == "amproxy: error: the server on %s sent no answer (its log may say " \
        "why)\n" % socket_path


def test_a_reader_that_goes_away_ends_the_command_quietly(socket_path):
    from conftest import AMPROXY
    body = table(*(device("sensor%05d" % i) for i in range(20000)))
    server = FakeServer(socket_path, answer(body, devices=20000))
    result = subprocess.run("%s devices --stats-socket %s | head -1" % (AMPROXY, socket_path),
                            shell=True, capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, AMPROXY_CONFIG="/dev/null"))
    server.close()
    assert result.stdout.startswith("KEY") and result.stderr == ""


def test_silent_past_a_century_is_refused_before_asking(socket_path, capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["devices", "--stats-socket", socket_path, "--silent", "999999d"])
    assert exit.value.code == 2
    assert "argument --silent: at most 36500d" in capsys.readouterr().err


def test_a_long_key_overflows_its_own_row_only():
    text = table(device("k" * 500), device("short", accepted=1, last_accepted=NOW - 5))
    lines = text.splitlines()
    assert lines[2].startswith("short" + " " * 61)  # the column is 64 wide
    assert len(lines[2]) < 200 and lines[1].startswith("k" * 500 + "  never")


def test_the_command_asks_the_server_and_prints_what_it_rendered(socket_path):
    body = table(device("sensor1", accepted=7, last_accepted=NOW - 7380, connected=True),
                 device("sensor2 caf\u00e9")) * 3000  # more than a read
    server = FakeServer(socket_path, answer(body, devices=2))
    status, out, err = run(["devices", "--stats-socket", socket_path, "--silent", "1h",
                            "--sort", "last-accepted"])
    server.close()
    assert (status, err) == (0, "")
    assert server.requests == [b'devices {"key":null,"output":"table","rejected":false,'
                               b'"silent":3600,"sort":"last-accepted"}\n']
    assert out == body


def test_the_command_finds_the_socket_beside_the_pidfile_and_asks_for_json(socket_path,
                                                                          tmp_path):
    body = render_json([device("a", accepted=1, last_accepted=NOW - 5)])
    server = FakeServer(socket_path, answer(body))
    status, out, err = run(["devices", "--pidfile", str(tmp_path / "amproxy.pid"),
                            "--rejected", "--key", "a", "--format", "json"])
    server.close()
    assert (status, err) == (0, "")
    assert parse_query(server.requests[0][8:]) == Query(None, True, "a", "key", "json")
    assert [d["key"] for d in json.loads(out)] == ["a"]


def test_a_query_the_server_refuses_is_its_sentence(socket_path):
    server = FakeServer(socket_path, json.dumps({"error": "amproxy devices: sort must be "
                                                 "one of key"}).encode() + b"\n")
    status, out, err = run(["devices", "--stats-socket", socket_path])
    server.close()
    assert (status, out) == (1, "")
    assert err == "amproxy: error: the server on %s says: amproxy devices: sort must be " \
        "one of key\n" % socket_path


def test_a_missing_socket_is_one_sentence(socket_path):
    status, out, err = run(["devices", "--stats-socket", socket_path])
    assert (status, out) == (1, "")
    assert err == "amproxy: error: cannot read devices from %s: No such file or " \
        "directory (is amproxy running, with this stats socket?)\n" % socket_path
    with open(socket_path, "w"):
        pass
    status, out, err = run(["devices", "--stats-socket", socket_path])
    assert status == 1 and err.endswith("Connection refused (it is not a socket: is that "
                                        "the stats socket's path?)\n")
    status, _, err = run(["devices"])
    assert status == 1 and err == "amproxy: error: no stats socket: pass --stats-socket " \
        "or --pidfile (or set them in the config file)\n"


def test_a_server_from_before_devices_is_named(socket_path):
    """Such a server answers its totals at once and closes without reading."""
    server = FakeServer(socket_path, json.dumps({"totals": {}, "gauges": {}}).encode(),
                        read=False)
    time.sleep(0.05)
    status, out, err = run(["devices", "--stats-socket", socket_path])
    server.close()
    assert (status, out) == (1, "")
    assert "from before 'amproxy devices'" in err and len(err.splitlines()) == 1


def test_an_unknown_key_alone_is_an_error(socket_path):
    server = FakeServer(socket_path, answer("", devices=0))
    status, out, err = run(["devices", "--stats-socket", socket_path, "--key", "nope"])
    server.close()
    assert (status, out) == (1, "")
    assert "has no key 'nope'" in err


def test_stats_still_reads_the_totals(socket_path):
    server = FakeServer(socket_path, b'{"totals": {"linesForwarded": 3}}')
    status, out, err = run(["stats", "--stats-socket", socket_path])
    server.close()
    assert status == 0 and json.loads(out) == {"totals": {"linesForwarded": 3}}
    assert server.requests == [b""]  # nothing sent, and the server saw the end of it


def test_the_man_page_has_the_command_and_its_options():
    import manpage  # tools/, on the path by conftest
    page = manpage.page()
    assert '.SS "amproxy devices' in page
    for flag in ("silent", "rejected", "key", "sort", "format"):
        assert "\\-\\-%s" % flag in page
    section = page.split('.SS "amproxy devices', 1)[1].split(".SS", 1)[0]
    assert "Default: \\fBkey" not in section  # the help says it already


def test_help_has_no_doubled_default(capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["devices", "--help"])
    assert exit.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "usage: amproxy devices" in text and "(default: )" not in text
    assert text.count("default: key") == 1 and text.count("default: table") == 1
