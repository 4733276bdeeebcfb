"""The master's answers about devices: `amproxy devices` (through the stats socket)
and the devices.* self-metrics, both read from the device table the workers fill.

A query is answered in a child of the master, forked for it: a fleet's list is
built and sent without holding up the master's loop.
"""

import json
import logging
import os
import time

log = logging.getLogger("amproxy.master")


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
            pid = os.fork()
        except OSError as e:
            log.error("cannot answer a devices query: %s", e.strerror or e)
            return
        if pid:
            return
        status = 1
        try:
            conn.settimeout(30)
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
        names = [wanted.encode()] if wanted else db.names()
        devices = []
        for public_key in names:
            key = db.get(public_key)
            if key is None:
                continue
            state = self.table.read(public_key)
            entry = state.as_json(public_key.decode("utf-8", "replace")) if state else \
                never_seen(public_key)
            if not selected(entry, filters, now):
                continue
            entry["previous_secret_expires"] = key.previous_until or None
            devices.append(entry)
        return json.dumps({"now": now, "started": self.started, "silent_after": silent_after,
                           "devices": devices}).encode()


def never_seen(public_key):
    return {"key": public_key.decode("utf-8", "replace"), "accepted": 0,
            "last_accepted": None, "last_rejected": None, "last_reason": None,
            "rejected_since": None, "rejected": {}, "skew": None, "old_secret": False,
            "address": None, "listener": None, "connected": False}


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
