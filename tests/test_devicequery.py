"""The master's answer to `amproxy devices`: the header line, the query's devices,
refusals in a sentence, and at most a few children answering at once."""
import json
import os
import socket
import time

import pytest

from amproxy.devicequery import MAX_ANSWERING, DeviceQueries
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
    assert lines[-1] == "4 devices: 1 accepted within 1h, 1 silent, 2 rejected only"


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


def test_a_request_that_does_not_parse_gets_a_sentence(queries):
    answer = queries.document(b'devices {"sort": "age"}\n', 3600)
    assert answer == b'{"error":"amproxy devices: sort must be one of key, last-accepted, ' \
        b'last-rejected, rejected"}\n'
    assert json.loads(queries.document(b"devices {\n", 3600))["error"] == \
        "amproxy devices: the request is not JSON"


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
    queries._answering.update(range(1, MAX_ANSWERING + 1))  # as if answering still
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
