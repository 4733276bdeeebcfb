"""The master's answer to `amproxy devices`: the header line, the query's devices,
refusals in a sentence, and at most a few children answering at once."""
import json
import os
import signal
import socket
import time

import pytest

from amproxy import devicequery
from amproxy.devicequery import KILL_AFTER, MAX_ANSWERING, DeviceQueries
from amproxy.devices import DeviceTable, Rejections
from amproxy.deviceview import Query, request_line
from amproxy.protocol import BAD_SIGNATURE, SKEW


class Key:
    def __init__(self, previous_until=0):
        self.previous_until = previous_until


class Snapshot:
    """What DeviceQueries reads of the auth file: its keys, by name."""

    def __init__(self, keys):
        self.keys = keys  # public key -> Key

    def names(self):
        return iter(self.keys)

    def get(self, public_key):
        return self.keys.get(public_key)


class AuthFile:
    def __init__(self, keys):
        self.db = Snapshot(keys)


@pytest.fixture
def queries():
    keys = {b"fine": Key(), b"ahead": Key(), b"old": Key(previous_until=1796000000.0),
            b"never": Key()}
    table = DeviceTable(len(keys), keys)
    now = time.time()
    ahead, old = Rejections(), Rejections()
    ahead.add(SKEW, now, skew=432)
    old.add(BAD_SIGNATURE, now, old_secret=True)
    table.record(0, now, {b"fine": 3}, {b"ahead": ahead, b"old": old},
                 {b"fine": ("192.0.2.1", False)})
    yield DeviceQueries(table, AuthFile(keys))
    table.close()


def ask(queries, query):
    header, _, body = queries.document(request_line(query), 3600).partition(b"\n")
    return json.loads(header), body.decode()


def test_the_header_then_the_table(queries):
    header, body = ask(queries, Query())
    assert header["devices"] == 4 and header["silent_after"] == 3600
    assert header["now"] >= header["started"]
    lines = body.splitlines()
    assert [line.split()[0] for line in lines[1:5]] == ["ahead", "fine", "never", "old"]
    assert "clock 7m12s ahead since" in lines[1]
    assert "yes from 192.0.2.1 (plain)" in lines[2]
    assert lines[3].endswith("never seen since amproxy started 0s ago")
    assert "signs with its previous secret, which expired 2026-11-30" in lines[4]
    assert lines[-1] == "4 devices: 2 rejected only, 1 accepted within 1h, 0 silent, " \
        "1 never seen"


def test_filters_and_json(queries):
    header, body = ask(queries, Query(rejected=True, output="json"))
    devices = json.loads(body)
    assert header["devices"] == 2 and [d["key"] for d in devices] == ["ahead", "old"]
    assert devices[1]["previous_secret_expires"] == 1796000000.0  # from the file
    assert devices[0]["previous_secret_expires"] is None
    _, body = ask(queries, Query(silent=60, output="json"))
    assert [d["key"] for d in json.loads(body)] == ["ahead", "never", "old"]
    header, body = ask(queries, Query(key="fine", output="json"))
    assert header["devices"] == 1 and json.loads(body)[0]["accepted"] == 3
    assert ask(queries, Query(key="nobody"))[0]["devices"] == 0


@pytest.mark.parametrize("body, says", [
    (b'{"sort": "age"}', "sort must be one of key, last-accepted, last-rejected, rejected"),
    (b"{", "the request is not JSON"),
    (b"[" * 60000, "the request is not JSON"),
    (b'{"silent": 1' + b"0" * 400 + b"}", "silent must be seconds"),
    (b'{"silent": NaN}', "silent must be seconds"),
    (b'{"key": "\\ud800"}', "key must be a string"),
])
def test_a_request_that_does_not_parse_gets_a_sentence(queries, body, says):
    answer = queries.document(b"devices " + body + b"\n", 3600)
    assert answer.endswith(b"\n") and answer.count(b"\n") == 1
    assert json.loads(answer) == {"error": "amproxy devices: " + says + (
        " (a number from 0 to %d)" % (100 * 365 * 86400) if "silent" in says else "")}


def test_a_query_that_fails_is_an_error_header_not_a_silence(queries, monkeypatch,
                                                              caplog):
    def broken(*args):
        raise RuntimeError("a bug")
    monkeypatch.setattr(queries.table, "states", broken)
    answer = json.loads(queries.document(request_line(Query()), 3600))
    assert answer == {"error": "amproxy devices: the server could not answer; its log says "
                      "why"}
    assert "a bug" in caplog.text


def test_the_header_gives_the_bodys_length(queries):
    header, body = ask(queries, Query(output="json"))
    assert header["bytes"] == len(body.encode())


def test_a_child_answers_and_the_master_goes_on(queries):
    ours, theirs = socket.socketpair()
    with ours, theirs:
        queries.answer(theirs, request_line(Query(key="fine")), 3600)
        [pid] = queries._answering
        theirs.close()  # as the master does
        answer = ours.makefile("rb").read()
        _, status = os.waitpid(pid, 0)
    assert status == 0 and json.loads(answer.split(b"\n")[0])["devices"] == 1
    queries.reaped(pid)
    assert not queries._answering


def test_past_the_children_allowed_the_master_says_it_is_busy(queries):
    queries._answering.update(dict.fromkeys(range(1, MAX_ANSWERING + 1), time.monotonic()))
    ours, theirs = socket.socketpair()
    with ours, theirs:
        queries.answer(theirs, request_line(Query()), 3600)
        theirs.close()
        answer = ours.makefile("rb").read()
    assert json.loads(answer) == {"error": "the server is answering %d devices queries "
                                  "already; try again in a moment" % MAX_ANSWERING}
    assert len(queries._answering) == MAX_ANSWERING  # no child forked
    queries.reaped(1)
    assert len(queries._answering) == MAX_ANSWERING - 1


def test_a_child_past_its_deadline_is_killed_even_stopped(queries):
    pid = os.fork()
    if pid == 0:
        os.kill(os.getpid(), signal.SIGSTOP)  # as a TTIN did to a child with no handler
        os._exit(0)
    try:
        queries._answering[pid] = time.monotonic()
        queries.kill_overdue()
        assert os.waitpid(pid, os.WNOHANG) == (0, 0)  # not yet overdue
        queries._answering[pid] = time.monotonic() - KILL_AFTER - 1
        queries.kill_overdue()
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_query_child_ignores_what_is_sent_to_the_whole_service(queries, monkeypatch):
    """systemctl kill -s TTIN (or HUP, USR1, USR2) reaches every process of the unit."""
    def slow_document(request, silent_after):
        os.kill(os.getpid(), signal.SIGTTIN)
        os.kill(os.getpid(), signal.SIGUSR1)
        return b"answered\n"
    monkeypatch.setattr(queries, "document", slow_document)
    ours, theirs = socket.socketpair()
    with ours, theirs:
        queries.answer(theirs, request_line(Query()), 3600)
        [pid] = queries._answering
        theirs.close()
        ours.settimeout(10)
        assert ours.makefile("rb").read() == b"answered\n"
        _, status = os.waitpid(pid, 0)
    assert status == 0
