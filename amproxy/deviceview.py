"""``amproxy devices``: which devices are silent, and why, in words an operator acts on.

The running server answers through its stats socket: the client sends one line,
``devices <JSON filter>``, and reads a JSON document until the server closes
(:func:`filter_request` makes the line; the reply is described in
:func:`render_table`).  The server applies the filter; everything here sorts
and renders what it sent, and takes ``now`` instead of reading the clock, so
that it is tested without a server.
"""

import datetime
import functools
import json

from .protocol import (BAD_METRIC, BAD_SIGNATURE, BAD_VALUE, LINE_TOO_LONG, MALFORMED,
                       METRIC_NOT_ALLOWED, RATE_LIMITED, REPLAYED, SKEW)

SORTS = ("key", "last-accepted", "last-rejected", "rejected")
FORMATS = ("table", "json")
DEFAULT_SILENT_AFTER = 3600  # when the reply does not say
HEADINGS = ("KEY", "LAST ACCEPTED", "ACCEPTED", "CONNECTED", "WHY")

_MALFORMED_REASONS = (BAD_METRIC, BAD_VALUE, MALFORMED, LINE_TOO_LONG)


def filter_request(silent=None, rejected=False, key=None):
    """The request line for the devices that match the filter: ``silent`` seconds
    with nothing accepted (never-seen keys included), ``rejected`` (the last line
    was rejected), ``key`` (that key only); None and False filter nothing."""
    if silent is not None and float(silent).is_integer():
        silent = int(silent)
    body = json.dumps({"silent": silent, "rejected": bool(rejected), "key": key},
                      sort_keys=True, separators=(",", ":"))
    return b"devices " + body.encode() + b"\n"


def format_age(seconds, exact=False):
    """A time span as amproxy writes durations, to its two largest units: 45s,
    7m12s, 2h0m, 3d4h.  ``exact``: without a zero second unit (1h, not 1h0m), for a
    span given in round numbers.  Every result is a duration --silent accepts."""
    seconds = int(max(0, seconds))
    if seconds < 60:
        return "%ds" % seconds
    for size, unit, small, small_unit in ((86400, "d", 3600, "h"), (3600, "h", 60, "m"),
                                          (60, "m", 1, "s")):
        if seconds >= size:
            rest = seconds % size // small
            if exact and not rest:
                return "%d%s" % (seconds // size, unit)
            return "%d%s%d%s" % (seconds // size, unit, rest, small_unit)


def format_time(epoch):
    """An instant as the operator reads it beside logs: 2026-12-01 14:03 UTC."""
    try:
        return _format_minute(int(epoch) // 60)
    except (ValueError, OverflowError, OSError):
        return "(time %r)" % (epoch,)


@functools.lru_cache(maxsize=4096)
def _format_minute(minute):
    # By the minute, which is all it shows: a fleet's rejections share minutes.
    return datetime.datetime.fromtimestamp(minute * 60, datetime.timezone.utc).strftime(
        "%Y-%m-%d %H:%M UTC")


def total_rejected(device):
    return sum((device.get("rejected") or {}).values())


def silent_for(device, now):
    """Seconds since the device's last accepted line; None if it never had one."""
    last = device.get("last_accepted")
    return None if last is None else now - last


def why(device, now, started, silent_after):
    """What is wrong with the device, in words that say what to do; "" when fine."""
    since = device.get("rejected_since")
    if since is not None:
        return _why_rejected(device, device.get("last_reason"), " since " + format_time(since))
    silent = silent_for(device, now)
    if silent is None:
        if device.get("last_rejected") is None:
            return "never seen since amproxy started %s ago" % format_age(now - started) \
                if started is not None else "never seen since amproxy started"
        return ""
    if silent >= silent_after:
        return "silent for %s; %s" % (format_age(silent), "connected but sending nothing"
                                      if device.get("connected") else "not connected")
    return ""


def _why_rejected(device, reason, since):
    if reason == SKEW:
        skew = device.get("skew")
        if skew is None:
            return "clock too far off" + since
        return "clock %s %s%s" % (format_age(abs(skew)), "ahead" if skew >= 0 else "behind",
                                  since)
    if reason == BAD_SIGNATURE:
        if device.get("old_secret"):
            expires = device.get("previous_secret_expires")
            return ("signs with its previous secret, which expired%s: give the device its "
                    "new secret (amproxy keys list shows the key's rotation)" % (
                        " " + format_time(expires) if expires is not None else ""))
        return "signature fails%s: wrong secret, or the line is altered on the way" % since
    if reason == METRIC_NOT_ALLOWED:
        return ("sends metrics its key may not write,%s (amproxy keys list shows what it "
                "may write)" % since)
    if reason == RATE_LIMITED:
        return "over its max_rate" + since
    if reason == REPLAYED:
        return "resends lines already accepted (a replay?)" + since
    if reason in _MALFORMED_REASONS:
        return "sends malformed lines (%s)%s" % (reason, since)
    return "its lines are rejected (%s)%s" % (reason or "reason unknown", since)


def connected_text(device):
    """yes from 203.0.113.7 (tls), no; last from 203.0.113.7 (plain), no."""
    address, listener = device.get("address"), device.get("listener")
    where = ""
    if address:
        where = "from %s" % address
    if listener:
        where = "%s (%s)" % (where, listener) if where else "(%s)" % listener
    if device.get("connected"):
        return "yes " + where if where else "yes"
    return "no; last " + where if address else "no"


def sort_devices(devices, order="key"):
    """A new list in the ``order`` (one of SORTS); ties by key.

    key: by name.  last-accepted: the longest silent first, those never accepted
    before all (the devices to look at first).  last-rejected: the latest
    rejection first, those never rejected last (what is failing now).
    rejected: the most rejected lines first.
    """
    if order == "key":
        return sorted(devices, key=lambda d: d["key"])
    if order == "last-accepted":
        return sorted(devices, key=lambda d: (d.get("last_accepted") is not None,
                                              d.get("last_accepted") or 0, d["key"]))
    if order == "last-rejected":
        return sorted(devices, key=lambda d: (d.get("last_rejected") is None,
                                              -(d.get("last_rejected") or 0), d["key"]))
    if order == "rejected":
        return sorted(devices, key=lambda d: (-total_rejected(d), d["key"]))
    raise ValueError("%r is not one of %s" % (order, ", ".join(SORTS)))


def last_accepted_text(device, now):
    silent = silent_for(device, now)
    return "never" if silent is None else format_age(silent) + " ago"


def summary(devices, now, silent_after):
    """N devices: A accepted within 1h, S silent, R rejected only.  Each device is
    counted once: accepted within the window; else rejected only (its lines since
    the last accepted one were all rejected); else silent (never-seen included)."""
    accepted = rejected = 0
    for device in devices:
        silent = silent_for(device, now)
        if silent is not None and silent < silent_after:
            accepted += 1
        elif device.get("rejected_since") is not None:
            rejected += 1
    count = len(devices)
    return "%d device%s: %d accepted within %s, %d silent, %d rejected only" % (
        count, "" if count == 1 else "s", accepted, format_age(silent_after, exact=True),
        count - accepted - rejected, rejected)


def _silent_after(reply, silent_after):
    if silent_after is not None:
        return silent_after
    value = reply.get("silent_after")
    return DEFAULT_SILENT_AFTER if value is None else value


def render_table(reply, now, order="key", silent_after=None):
    """The reply as aligned lines (KEY, LAST ACCEPTED, ACCEPTED, CONNECTED, WHY) and a
    summary, as one string.

    ``reply`` is the server's document: ``now``, ``started`` (epoch seconds),
    ``silent_after`` (seconds; ``silent_after`` given here wins), and ``devices``,
    each with ``key``, ``accepted``, ``last_accepted``, ``last_rejected``,
    ``last_reason``, ``rejected_since``, ``rejected``, ``skew``, ``old_secret``,
    ``previous_secret_expires``, ``address``, ``listener`` and ``connected``.
    """
    window = _silent_after(reply, silent_after)
    started = reply.get("started")
    devices = sort_devices(reply.get("devices") or [], order)
    rows = [HEADINGS]
    rows.extend((d["key"], last_accepted_text(d, now), str(d.get("accepted") or 0),
                 connected_text(d), why(d, now, started, window)) for d in devices)
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    key_w, last_w, count_w, conn_w = widths
    lines = [("%-*s  %-*s  %*s  %-*s  %s" % (key_w, key, last_w, last, count_w, count,
                                            conn_w, conn, reason)).rstrip()
             for key, last, count, conn, reason in rows]
    lines.append(summary(devices, now, window))
    return "\n".join(lines) + "\n"


def render_json(reply, order="key"):
    """The devices of the reply, sorted, as one JSON document: a list, one device a
    line (grep finds a key's line; the compact encoder is fast for a big fleet)."""
    devices = sort_devices(reply.get("devices") or [], order)
    if not devices:
        return "[]\n"
    encode = json.JSONEncoder().encode  # the fields in the order the server sent them
    return "[\n" + ",\n".join(map(encode, devices)) + "\n]\n"


def render(reply, now=None, order="key", output="table", silent_after=None):
    """The command's output for ``reply``; ``now`` defaults to the reply's."""
    if output == "json":
        return render_json(reply, order)
    return render_table(reply, reply["now"] if now is None else now, order, silent_after)
