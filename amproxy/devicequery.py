"""The master's answers about devices: `amproxy devices` (through the stats socket)
and the devices.* self-metrics, both read from the device table the workers fill.

A query is answered in a child of the master, forked for it: a fleet's list is
built and sent without holding up the master's loop.
"""

import gc
import json
import logging
import os
import signal
import time

from .devices import DeviceState
from .deviceview import parse_query, render
from .links import NOT_FOR_A_CHILD, fork_plain_child

log = logging.getLogger("amproxy.master")

# The longest a child may take to answer, however slowly its client reads; the master
# kills one still there a moment later (a stopped child gets no alarm).
ANSWER_DEADLINE = 30
KILL_AFTER = ANSWER_DEADLINE + 5
# Children answering at once, at most: each holds a fleet's answer in memory.
MAX_ANSWERING = 4


class DeviceQueries:
    def __init__(self, table, auth_file):
        self.table = table  # devices.DeviceTable
        self.auth_file = auth_file  # its db: the keys there are now
        self.started = time.time()
        self._answering = {}  # pid -> when forked (monotonic): the children answering now

    def gauges(self, interval, silent_after):
        """devices.seen, devices.silent and devices.rejectedOnly, for an interval's end."""
        seen, silent, rejected_only = self.table.summary(time.time(), interval, silent_after)
        return {"devices.seen": seen, "devices.silent": silent,
                "devices.rejectedOnly": rejected_only}

    def answer(self, conn, request, silent_after):
        """Fork a child that sends the answer to ``request`` (b"devices {query}") on
        ``conn``; the master closes its copy and goes on.  At most MAX_ANSWERING
        children at once: past that the master answers that it is busy."""
        if len(self._answering) >= MAX_ANSWERING:
            _send_quietly(conn, _header(error="the server is answering %d devices queries "
                                        "already; try again in a moment" % MAX_ANSWERING))
            return
        try:
            pid = fork_plain_child(ignore=NOT_FOR_A_CHILD)
        except OSError as e:
            log.error("cannot answer a devices query: %s", e.strerror or e)
            return
        if pid:
            self._answering[pid] = time.monotonic()
            return
        status = 1
        try:
            # Nothing of the master's: not its port (a restart must be able to bind it),
            # not the signals meant for the service; and never more than the deadline.
            os.closerange(3, conn.fileno())
            os.closerange(conn.fileno() + 1, os.sysconf("SC_OPEN_MAX"))
            signal.alarm(ANSWER_DEADLINE)
            gc.disable()  # a fleet's states are 100,000 objects; the child exits next
            conn.settimeout(ANSWER_DEADLINE)
            conn.sendall(self.document(request, silent_after))
            status = 0
        except Exception:  # a query must never take anything else down
            log.exception("devices query failed")
        finally:
            os._exit(status)

    def reaped(self, pid):
        """The master reaped ``pid`` (any child of its)."""
        self._answering.pop(pid, None)

    def kill_overdue(self):
        """Kill the children past their deadline (the master reaps them)."""
        now = time.monotonic()
        for pid, forked in list(self._answering.items()):
            if now - forked > KILL_AFTER:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def document(self, request, silent_after):
        """The header line (with the body's length), then the output the query asks for;
        or a header with the error, in a sentence."""
        try:
            query = parse_query(request.partition(b" ")[2].strip())
        except ValueError as e:
            return _header(error="amproxy devices: %s" % e)
        try:
            return self._answer_to(query, silent_after)
        except Exception:
            log.exception("devices query failed")
            return _header(error="amproxy devices: the server could not answer; its log "
                           "says why")

    def _answer_to(self, query, silent_after):
        now = time.time()
        db = self.auth_file.db
        if query.key is not None:
            wanted = query.key.encode("utf-8", "surrogateescape")
            names = [wanted] if wanted in db.keys else []
        else:
            names = db.names()
        devices = []
        for public_key, state in self.table.states(
                names, None if query.silent is None else now - query.silent, query.rejected):
            if state is None:
                state = DeviceState(public_key.decode("utf-8", "replace"),
                                    tracked=self.table.tracked(public_key))
            elif state.old_secret:  # the words need the rotation's end, from the file
                state = state._replace(
                    previous_secret_expires=db.get(public_key).previous_until or None)
            devices.append(state)
        body = render(devices, query, now, self.started, silent_after).encode("utf-8",
                                                                             "replace")
        return _header(now=now, started=self.started, silent_after=silent_after,
                       devices=len(devices), bytes=len(body)) + body


def _header(**fields):
    return json.dumps(fields, separators=(",", ":")).encode() + b"\n"


def _send_quietly(conn, data):
    try:
        conn.settimeout(1)
        conn.sendall(data)
    except OSError:
        pass
