"""``amproxy devices``: which devices are silent, and why, in words an operator acts on.

The client sends one line on the stats socket, ``devices <JSON query>``
(:func:`request_line`; the server reads it with :func:`parse_query`).  A child of
the server's master answers with a header line (JSON: ``now``, ``started``,
``silent_after``, ``devices``, how many follow, and ``bytes``, the output's
length; or ``error``, one sentence) and then the output itself, which
:func:`render` makes there: the client checks its length and prints it, so a
fleet's list costs one pass over the table and no decoding.  Everything
here takes ``now`` instead of reading the clock, so that it is tested without a
server.
"""

import datetime
import functools
import json
import operator
from typing import NamedTuple, Optional

from .devices import DeviceState
from .protocol import (BAD_METRIC, BAD_SIGNATURE, BAD_VALUE, LINE_TOO_LONG, MALFORMED,
                       METRIC_NOT_ALLOWED, RATE_LIMITED, REPLAYED, SKEW)

SORTS = ("key", "last-accepted", "last-rejected", "rejected")
FORMATS = ("table", "json")
HEADINGS = ("KEY", "LAST ACCEPTED", "ACCEPTED", "CONNECTED", "WHY")
MAX_SILENT = 100 * 365 * 86400  # seconds: a century
# The KEY column is at most this wide: a longer key overflows its own row only.
MAX_KEY_WIDTH = 64

_MALFORMED_REASONS = (BAD_METRIC, BAD_VALUE, MALFORMED, LINE_TOO_LONG)


class Query(NamedTuple):
    """What ``amproxy devices`` asks for: ``silent`` seconds with nothing accepted
    (never-seen keys included; it is also the summary's window), ``rejected`` (the
    last line was rejected), ``key`` (that key only); None and False filter nothing."""
    silent: Optional[float] = None
    rejected: bool = False
    key: Optional[str] = None
    sort: str = "key"
    output: str = "table"


def request_line(query):
    """The line the client sends for ``query``: one line, whatever the key."""
    fields = query._asdict()
    if query.silent is not None and float(query.silent).is_integer():
        fields["silent"] = int(query.silent)
    return b"devices " + json.dumps(fields, sort_keys=True, separators=(",", ":")).encode() \
        + b"\n"


def parse_query(body):
    """The :class:`Query` of a request's JSON (bytes); ValueError, saying why, for one
    that does not parse or asks for what amproxy does not know."""
    try:
        fields = json.loads(body or b"{}")
    except (ValueError, RecursionError):
        raise ValueError("the request is not JSON") from None
    if not isinstance(fields, dict) or not set(fields) <= set(Query._fields):
        raise ValueError("the request must be an object with only the fields %s"
                         % ", ".join(Query._fields))
    query = Query(**fields)
    silent, key = query.silent, query.key
    if silent is not None and (isinstance(silent, bool) or not isinstance(silent, (int, float))
                               or not 0 <= silent <= MAX_SILENT):
        raise ValueError("silent must be seconds (a number from 0 to %d)" % MAX_SILENT)
    if not isinstance(query.rejected, bool):
        raise ValueError("rejected must be true or false")
    if key is not None and not (isinstance(key, str) and _encodes(key)):
        raise ValueError("key must be a string")
    if query.sort not in SORTS:
        raise ValueError("sort must be one of %s" % ", ".join(SORTS))
    if query.output not in FORMATS:
        raise ValueError("output must be one of %s" % ", ".join(FORMATS))
    return query


def _encodes(key):
    try:
        key.encode("utf-8", "surrogateescape")  # as the server looks it up
    except UnicodeEncodeError:
        return False
    return True


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
    return sum(device.rejected.values())


def silent_for(device, now):
    """Seconds since the device's last accepted line; None if it never had one."""
    last = device.last_accepted
    return None if last is None else now - last


def why(device, now, started, silent_after):
    """What is wrong with the device, in words that say what to do; "" when fine."""
    since = device.rejected_since
    if since is not None:
        words = _why_rejected(device, device.last_reason, " since " + format_time(since))
        others = [(reason, lines) for reason, lines in device.rejected.items()
                  if reason != device.last_reason]
        if others:  # a device broken in more ways than one
            words += "; also rejected since amproxy started: " + _reasons_text(others)
        return words
    silent = silent_for(device, now)
    if silent is None:
        if not device.tracked:
            return ("not tracked: the device table is full (keys added since amproxy "
                    "started); restart amproxy to size it for the auth file")
        if device.last_rejected is None:
            return "never seen since amproxy started %s ago" % format_age(now - started)
        return ""
    if silent >= silent_after:
        return "silent for %s; %s" % (format_age(silent), "connected but sending nothing"
                                      if device.connected else "not connected")
    if device.last_rejected is not None and now - device.last_rejected < silent_after:
        # Accepted, and some lines rejected lately: a metric it was not given, say.
        rejected = total_rejected(device)
        return "%d line%s rejected since amproxy started, the last %s ago: %s" % (
            rejected, "" if rejected == 1 else "s", format_age(now - device.last_rejected),
            _reasons_text(device.rejected.items()))
    return ""


def _reasons_text(counts):
    """metrics its key may not write (3), its clock is off (1): the most first."""
    return ", ".join("%s (%d)" % (_REJECTED_LINES.get(reason, reason), lines)
                     for reason, lines in sorted(counts, key=lambda item: (-item[1], item[0])))


# What a device's rejected lines are, by reason, in an operator's words.
_REJECTED_LINES = {
    SKEW: "its clock is off", BAD_SIGNATURE: "the signature fails (wrong secret?)",
    METRIC_NOT_ALLOWED: "metrics its key may not write", RATE_LIMITED: "over its max_rate",
    REPLAYED: "lines already accepted, sent again", BAD_METRIC: "metric names Carbon refuses",
    BAD_VALUE: "values that are not numbers", MALFORMED: "lines not in the wire format",
    LINE_TOO_LONG: "lines longer than --max-line-length"}


def _why_rejected(device, reason, since):
    if reason == SKEW:
        skew = device.skew
        if skew is None:
            return "clock too far off" + since
        return "clock %s %s%s" % (format_age(abs(skew)), "ahead" if skew >= 0 else "behind",
                                  since)
    if reason == BAD_SIGNATURE:
        if device.old_secret:
            expires = device.previous_secret_expires
            return ("signs with its previous secret, which expired%s: give the device its "
                    "new secret (amproxy keys list shows the key's rotation)" % (
                        " " + format_time(expires) if expires is not None else ""))
        return "signature fails%s: wrong secret, or the line is altered on the way" % since
    if reason == METRIC_NOT_ALLOWED:
        return ("sends metrics its key may not write%s (amproxy keys list shows what it "
                "may write)" % since)
    if reason == RATE_LIMITED:
        return "over its max_rate" + since
    if reason == REPLAYED:
        return "resends lines already accepted (a replay?)" + since
    if reason in _MALFORMED_REASONS:
        return "sends %s%s" % (_REJECTED_LINES[reason], since)
    return "its lines are rejected (%s)%s" % (reason or "reason unknown", since)


def connected_text(device):
    """yes from 203.0.113.7 (tls), no; last from 203.0.113.7 (plain), no."""
    address, listener = device.address, device.listener
    where = ""
    if address:
        where = "from %s" % address
    if listener:
        where = "%s (%s)" % (where, listener) if where else "(%s)" % listener
    if device.connected:
        return "yes " + where if where else "yes"
    return "no; last " + where if address else "no"


_KEY = operator.attrgetter("key")


def sort_devices(devices, order="key"):
    """A new list in the ``order`` (one of SORTS); ties by key.

    key: by name.  last-accepted: the longest silent first, those never accepted
    before all (the devices to look at first).  last-rejected: the latest
    rejection first, those never rejected last (what is failing now).
    rejected: the most rejected lines first.
    """
    if order == "key":
        return sorted(devices, key=_KEY)
    if order == "last-accepted":
        return sorted(devices, key=lambda d: (d.last_accepted is not None,
                                              d.last_accepted or 0, d.key))
    if order == "last-rejected":
        return sorted(devices, key=lambda d: (d.last_rejected is None,
                                              -(d.last_rejected or 0), d.key))
    if order == "rejected":
        return sorted(devices, key=lambda d: (-total_rejected(d), d.key))
    raise ValueError("%r is not one of %s" % (order, ", ".join(SORTS)))


def summary(devices, now, silent_after):
    """N devices: R rejected only, A accepted within 1h, S silent, V never seen.  Each
    device is counted once, as its WHY says: rejected only (its lines since the last
    accepted one were all rejected); else accepted within the window; else never
    seen (no line at all since amproxy started); else silent."""
    accepted = rejected = never = 0
    for device in devices:
        silent = silent_for(device, now)
        if device.rejected_since is not None:
            rejected += 1
        elif silent is not None and silent < silent_after:
            accepted += 1
        elif silent is None and device.last_rejected is None:
            never += 1
    count = len(devices)
    return "%d device%s: %d rejected only, %d accepted within %s, %d silent, %d never seen" % (
        count, "" if count == 1 else "s", rejected, accepted,
        format_age(silent_after, exact=True), count - accepted - rejected - never, never)


def render_table(devices, now, started, silent_after, order="key"):
    """The devices (:class:`amproxy.devices.DeviceState`) as aligned lines (KEY, LAST
    ACCEPTED, ACCEPTED, CONNECTED, WHY) and a summary over ``silent_after`` s."""
    devices = sort_devices(devices, order)
    rows = [HEADINGS]
    rows.extend(_rows(devices, now, started, silent_after))
    widths = [max(map(len, column)) for column in list(zip(*rows))[:4]]
    widths[0] = min(widths[0], MAX_KEY_WIDTH)
    key_w, last_w, count_w, conn_w = widths
    lines = [("%-*s  %-*s  %*s  %-*s  %s" % (key_w, key, last_w, last, count_w, count,
                                            conn_w, conn, reason)).rstrip()
             for key, last, count, conn, reason in rows]
    lines.append(summary(devices, now, silent_after))
    return "\n".join(lines) + "\n"


def _rows(devices, now, started, silent_after):
    """The table's rows; a fleet's are 100,000, so the usual ones are made quickly."""
    for d in devices:
        last = d.last_accepted
        if last is None:
            last_text = "never"
        else:
            last_text = _ago(int(now - last))
            if d.rejected_since is None and now - last < silent_after and (
                    d.last_rejected is None or now - d.last_rejected >= silent_after):
                # Fine: no words.
                yield d.key, last_text, str(d.accepted), connected_text(d), ""
                continue
        yield d.key, last_text, str(d.accepted), connected_text(d), why(d, now, started,
                                                                        silent_after)


@functools.lru_cache(maxsize=1 << 16)
def _ago(seconds):
    return format_age(seconds) + " ago"


def render_json(devices, order="key"):
    """The devices, sorted, as one JSON document: a list, one device a line (grep
    finds a key's line), each an object with every field of the state, as
    ``json.dumps(device._asdict())`` writes it (a dict and an encoder a device cost
    twice as much)."""
    devices = sort_devices(devices, order)
    if not devices:
        return "[]\n"
    return "[\n" + ",\n".join(map(_device_json, devices)) + "\n]\n"


_string = json.encoder.encode_basestring_ascii  # what json.dumps uses for a str


def _device_json(d):
    return _DEVICE_JSON % (
        _string(d.key), d.accepted, _number(d.last_accepted), _number(d.last_rejected),
        _text(d.last_reason), _number(d.rejected_since),
        json.dumps(d.rejected) if d.rejected else "{}", _number(d.skew),
        "true" if d.old_secret else "false", _number(d.previous_secret_expires),
        _text(d.address), _text(d.listener), "true" if d.connected else "false",
        "true" if d.tracked else "false")


def _number(value):
    return "null" if value is None else repr(value)


def _text(value):
    return "null" if value is None else _string(value)


_DEVICE_JSON = "{%s}" % ", ".join('"%s": %s' % (field, "%d" if field == "accepted" else "%s")
                                  for field in DeviceState._fields)


def render(devices, query, now, started, silent_after):
    """The command's output for the devices the query selected; the summary's window
    is the query's ``silent`` if it has one, else ``silent_after``."""
    if query.output == "json":
        return render_json(devices, query.sort)
    window = query.silent if query.silent is not None else silent_after
    return render_table(devices, now, started, window, query.sort)
