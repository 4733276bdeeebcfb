"""The master's answers about devices: `amproxy devices` (through the stats socket)
and the devices.* self-metrics, both read from the device table the workers fill.

A query is answered in a child of the master, forked for it: a fleet's list is
built and sent without holding up the master's loop.
"""

import json
import logging
import os
import signal
import time

from .links import fork_plain_child

log = logging.getLogger("amproxy.master")

# The longest a child may take to answer, however slowly its client reads.
ANSWER_DEADLINE = 30


class DeviceQueries:
    def __init__(self, table, auth_file):
        self.table = table  # devices.DeviceTable
        self.auth_file = auth_file  # its db: the keys there are now
        self.started = time.time()

    def gauges(self, interval, silent_after):
        """devices.seen, devices.silent and devices.rejectedOnly, for an interval's end."""
        seen, silent, rejected_only = self.table.summary(
            list(self.auth_file.db.names()), time.time(), interval, silent_after)
        return {"devices.seen": seen, "devices.silent": silent,
                "devices.rejectedOnly": rejected_only}

    def answer(self, conn, request, silent_after):
        """Fork a child that sends the answer to ``request`` (b"devices {filters}") on
        ``conn``; the master closes its copy and goes on."""
        try:
            pid = fork_plain_child()
        except OSError as e:
            log.error("cannot answer a devices query: %s", e.strerror or e)
            return
        if pid:
            return
        status = 1
        try:
            # Nothing of the master's: not its port (a restart must be able to bind it);
            # and never more than the deadline.
            os.closerange(3, conn.fileno())
            os.closerange(conn.fileno() + 1, os.sysconf("SC_OPEN_MAX"))
            signal.alarm(ANSWER_DEADLINE)
            conn.settimeout(ANSWER_DEADLINE)
            conn.sendall(self.document(request, silent_after))
            status = 0
        except Exception:  # a query must never take anything else down
            log.exception("devices query failed")
        finally:
            os._exit(status)

    def document(self, request, silent_after):
        """The JSON answer: the devices the filters select."""
        try:
            filters = json.loads(request.partition(b" ")[2] or b"{}")
        except ValueError:
            filters = {}
        now = time.time()
        db = self.auth_file.db
        wanted = filters.get("key")
        names = [wanted.encode()] if wanted and wanted.encode() in db.keys else \
            [] if wanted else db.names()
        devices = []
        unseen = None if filters.get("rejected") else _NEVER_SEEN  # a never-seen key passes
        for public_key in names:
            state = self.table.read(public_key)
            name = public_key.decode("utf-8", "replace")
            if state is None:
                if unseen is not None:  # the same entry but for the name: no dict, no dumps
                    devices.append(unseen % _dumps(name))
                continue
            entry = state.as_json(name)
            if not selected(entry, filters, now):
                continue
            # Only where the words need it: building a key from the file costs.
            entry["previous_secret_expires"] = (db.get(public_key).previous_until or None) \
                if entry["old_secret"] else None
            devices.append(_dumps(entry))
        return ('{"now":%s,"started":%s,"silent_after":%s,"devices":[%s]}' % (
            _dumps(now), _dumps(self.started), _dumps(silent_after),
            ",".join(devices))).encode()


def _dumps(value):
    return json.dumps(value, separators=(",", ":"))


# A key with no state (never seen since start, or since a reload dropped it), as JSON.
_NEVER_SEEN = _dumps({
    "key": "NAME", "accepted": 0, "last_accepted": None, "last_rejected": None,
    "last_reason": None, "rejected_since": None, "rejected": {}, "skew": None,
    "old_secret": False, "previous_secret_expires": None, "address": None, "listener": None,
    "connected": False}).replace("%", "%%").replace('"NAME"', "%s", 1)


def selected(entry, filters, now):
    """Whether ``entry`` passes the filters: silent (nothing accepted for that long,
    never seen included), rejected (its last line was rejected)."""
    silent = filters.get("silent")
    if silent is not None and entry["last_accepted"] is not None and \
            now - entry["last_accepted"] < silent:
        return False
    if filters.get("rejected") and entry["rejected_since"] is None:
        return False
    return True
