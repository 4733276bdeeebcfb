"""``amproxy keys`` and ``amproxy auth-file check``: edit and inspect the auth file.

A file in the standard layout (:mod:`amproxy.authscan`, the one these
commands write) is edited as bytes: the one key's entry is added, replaced
or cut out, everything else is copied as it was, and the result is scanned
back (the key count, and the key as intended) before it replaces the file.

Other files keep the operator's comments and layout where the key's entry
can be found by its lines; otherwise they are rewritten from their data.
Either way the result is parsed back and compared with what was intended.  Every file is replaced atomically (temp
file, fsync, rename), with the old file's mode and owner.
"""

import contextlib
import fcntl
import logging
import os
import re
import secrets
import tempfile
import time

import yaml

from .auth import (split_patterns, format_rfc3339, load_auth_file, parse_auth_data,
                   parse_auth_file, parse_auth_text, read_auth_file)
from .authscan import (Layout, count_entries, entries, entry_block, entry_values, scan,
                       standard_block)
from .authsnapshot import SLOW_LAYOUT, SLOW_LAYOUT_WARNING_KEYS
from .errors import AuthFileError
from .protocol import metric_problem

log = logging.getLogger(__name__)

SECRET_BYTES = 32
_KEY_LINE = re.compile(r"( +)([^\s#:][^:]*):\s*$")
_EMPTY_APIKEYS = re.compile(r"^apikeys:[ \t]*\{\}[ \t]*$", re.MULTILINE)


def new_secret():
    """A random secret of 32 bytes, URL-safe base64, starting with a letter or digit."""
    while True:
        secret = secrets.token_urlsafe(SECRET_BYTES)
        if secret[0].isalnum():
            return secret


def _yaml_scalar(text):
    dumped = yaml.safe_dump(text, default_flow_style=True, width=1 << 20)
    return dumped.replace("\n...\n", "").strip()


def _read(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise AuthFileError("cannot read auth file %s: %s" % (path, e.strerror)) from None


def _summary_of(db):
    """What each key is: its secret and everything it may write."""
    summary = {}
    for name, key in db.keys.items():
        secret, metrics, previous, until, max_rate = key.entry()
        summary[name] = (secret, frozenset(metrics), previous, until, max_rate)
    return summary


def _write_atomically(path, pieces, check=None):
    """Replace the file with ``pieces`` (bytes) if ``check(temp_path)`` passes."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    fd, temp = tempfile.mkstemp(prefix=".auth-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.writelines(pieces)
            f.flush()
            os.fsync(f.fileno())
        if check is not None and not check(temp):
            raise AuthFileError("could not write a valid auth file %s; it was not "
                                "changed" % path)
        os.chmod(temp, st.st_mode & 0o7777 if st else 0o640)
        if st is not None and os.geteuid() == 0:
            os.chown(temp, st.st_uid, st.st_gid)
        os.rename(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _scanned(path, public_key=None):
    """The file's bytes and its scan (None if not the standard layout); (None, None) if
    there is no file."""
    if not os.path.exists(path):
        return None, None
    raw = read_auth_file(path)
    return raw, scan(raw, path, public_key and public_key.encode())


def _summary_of_entry(layout, m):
    """What a scanned key is, as :func:`_summary_of` tells it."""
    _, secret, metrics, previous, until, max_rate = entry_values(layout, m)
    return secret, frozenset(metrics), previous, until, max_rate


def _replace_entry(path, raw, scanned, public_key, block, expected):
    """Write the file with the key's entry replaced by ``block``: added at the end if
    the key is new, cut out if ``block`` is empty.  ``expected``: the key's summary
    afterwards (None: gone).  Everything else is copied as it was."""
    found = scanned.found
    start, end = found.span(1) if found else (len(raw), len(raw))
    count = len(scanned) + (expected is not None) - (found is not None)

    def check(temp):
        back = count_entries(read_auth_file(temp), scanned.layout, public_key.encode())
        if back is None or back[0] != count:
            return False
        if expected is None:
            return back[1] is None
        return back[1] is not None and _summary_of_entry(scanned.layout, back[1]) == expected

    view = memoryview(raw)
    _write_atomically(path, [view[:start], block, view[end:]], check)


def _layout(text):
    """Indentation of key lines, field lines and metric items in a usual-layout file."""
    key_indent, field_indent, item_prefix = "  ", "    ", None
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if _KEY_LINE.match(line) and i + 1 < len(lines):
            key_indent = _KEY_LINE.match(line).group(1)
            nxt = lines[i + 1]
            field_indent = nxt[:len(nxt) - len(nxt.lstrip(" "))] or field_indent
            break
    for line in lines:
        stripped = line.lstrip(" ")
        if stripped.startswith("- "):
            item_prefix = line[:len(line) - len(stripped)] + "- "
            break
    return key_indent, field_indent, item_prefix or field_indent + "- "


def _replace_file(path, text, expected, fallback_data):
    """Write ``text`` if it parses to ``expected``, else the rewritten ``fallback_data``."""
    for candidate in (text, None):
        if candidate is None:
            candidate = "---\n" + yaml.safe_dump(fallback_data, default_flow_style=False,
                                                 sort_keys=False)
        try:
            if _summary_of(parse_auth_data(parse_auth_text(candidate), path)) == expected:
                _write_atomically(path, [candidate.encode("utf-8")])
                return candidate is text
        except (yaml.YAMLError, AuthFileError):
            pass
    raise AuthFileError("could not write a valid auth file %s; it was not changed" % path)


@contextlib.contextmanager
def _edit(path):
    """One edit of the auth file at a time: a second ``amproxy keys`` waits for the first,
    else both read the same file and the last rename loses the other's key.  The lock
    is on the file's directory, which a rename of the file does not replace."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise AuthFileError("cannot open %s, the directory of auth file %s: %s" % (
            directory, path, e.strerror or e)) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # and the lock with it


def add_key(path, public_key, patterns):
    """Add a key with a new secret; return it, and whether the file's layout was kept.

    Refuses a duplicate.
    """
    with _edit(path):
        return _add_key(path, public_key, patterns)


def revoke_key(path, public_key):
    """Remove a key; return whether the file's layout was kept.  Raise if it is absent."""
    with _edit(path):
        return _revoke_key(path, public_key)


def rotate_key(path, public_key, grace_seconds, now):
    """Give a key a new secret, keeping the current one as previous for ``grace_seconds``.

    Returns the new secret and whether the file's layout was kept.  A secret
    that was already previous is dropped: its devices had the whole grace
    period to take the one that replaced it.
    """
    with _edit(path):
        return _rotate_key(path, public_key, grace_seconds, now)


def _add_key(path, public_key, patterns):
    if not public_key or re.search(r"\s", public_key):
        raise AuthFileError("public key %r must be a non-empty string without spaces"
                            % public_key)
    if not patterns:
        raise AuthFileError("give the new key at least one --metric")
    raw, scanned = _scanned(path, public_key)
    if scanned is not None:
        if scanned.found:
            raise AuthFileError("auth file %s already has a key %r" % (path, public_key))
        _check_patterns(path, public_key, patterns)
        secret = new_secret()
        block = standard_block(scanned.layout, public_key.encode(), secret.encode(),
                               [p.encode() for p in patterns])
        if block is not None:
            _replace_entry(path, raw, scanned, public_key, block,
                           (secret, frozenset(patterns), None, 0, 0.0))
            return secret, True
    del raw, scanned
    text = _read(path)
    if text is None:
        text = "---\napikeys:\n"
        current = {}
    else:
        current = _summary_of(load_auth_file(path))
    if public_key.encode() in current:
        raise AuthFileError("auth file %s already has a key %r" % (path, public_key))
    _check_patterns(path, public_key, patterns)
    secret = new_secret()
    # The installed file holds no key yet: "apikeys: {}" becomes the usual layout.
    text = _EMPTY_APIKEYS.sub("apikeys:", text, count=1)
    def quote(value):  # as YAML needs it written
        return _yaml_scalar(value.decode()).encode()
    block = entry_block(Layout(*(part.encode() for part in _layout(text))),
                        quote(public_key.encode()), secret.encode(),
                        [pattern.encode() for pattern in patterns], quote=quote)
    new_text = text + ("" if text.endswith("\n") else "\n") + block.decode()
    expected = dict(current)
    expected[public_key.encode()] = (secret, frozenset(patterns), None, 0, 0.0)
    data = _data_of(path, text)
    data["apikeys"][public_key] = {"secret_key": secret, "metrics": list(patterns)}
    kept_layout = _replace_file(path, new_text, expected, data)
    return secret, kept_layout


def _check_patterns(path, public_key, patterns):
    """Validate the patterns (and name the bad one) before anything is written."""
    parse_auth_data({"apikeys": {public_key: {"secret_key": "x", "metrics": list(patterns)}}},
                    path)


def _data_of(path, text):
    data = parse_auth_text(text) or {}
    data.setdefault("apikeys", {})
    if data["apikeys"] is None or data["apikeys"] == "":
        data["apikeys"] = {}
    return data


def _existing_key(path, public_key):
    """The file's text and every key's summary; raise unless ``public_key`` is in it."""
    text = _read(path)
    if text is None:
        raise AuthFileError("cannot read auth file %s: no such file" % path)
    current = _summary_of(load_auth_file(path))
    if public_key.encode() not in current:
        raise AuthFileError("auth file %s has no key %r" % (path, public_key))
    return text, current


def _key_block(lines, public_key):
    """(first, end): the lines of ``public_key``'s entry, its own line first."""
    first, indent = None, None
    for i, line in enumerate(lines):
        match = _KEY_LINE.match(line.rstrip("\n"))
        if first is None:
            if match and match.group(2).strip("'\"") == public_key:
                first, indent = i, len(match.group(1))
            continue
        content = line.lstrip(" ")
        if content.strip() and len(line) - len(content) <= indent:
            return first, i
    return first, len(lines)


def _revoke_key(path, public_key):
    raw, scanned = _scanned(path, public_key)
    if scanned is not None:
        if scanned.found is None:
            raise AuthFileError("auth file %s has no key %r" % (path, public_key))
        _replace_entry(path, raw, scanned, public_key, b"", None)
        return True
    del raw
    text, current = _existing_key(path, public_key)
    lines = text.splitlines(keepends=True)
    first, end = _key_block(lines, public_key)
    kept = lines if first is None else lines[:first] + lines[end:]
    expected = dict(current)
    del expected[public_key.encode()]
    data = _data_of(path, text)
    del data["apikeys"][public_key]
    return _replace_file(path, "".join(kept), expected, data)


_SECRET_LINE = re.compile(r"( +)secret_key:")
MAX_GRACE_SECONDS = 3650 * 86400
_PREVIOUS_LINE = re.compile(r" +previous_secret_(key|expires):")


def _rotate_key(path, public_key, grace_seconds, now):
    if not 0 <= grace_seconds <= MAX_GRACE_SECONDS:
        raise AuthFileError("--grace must be between 0 and %d days" % (MAX_GRACE_SECONDS // 86400))
    raw, scanned = _scanned(path, public_key)
    if scanned is not None:
        if scanned.found is None:
            raise AuthFileError("auth file %s has no key %r" % (path, public_key))
        old = _summary_of_entry(scanned.layout, scanned.found)
    else:
        text, current = _existing_key(path, public_key)
        old = current[public_key.encode()]
    old_secret, metrics, dropped, dropped_until, max_rate = old
    if dropped and dropped_until > now:
        log.warning("key %r: its previous secret, valid until %s, no longer passes: devices "
                    "still on it are refused from now on", public_key,
                    format_rfc3339(dropped_until))
    secret = new_secret()
    until = int(now + grace_seconds)
    if grace_seconds:  # no grace: the old secret stops at once, nothing to keep
        expected = (secret, metrics, old_secret, until, max_rate)
    else:
        expected = (secret, metrics, None, 0, max_rate)
    if scanned is not None:
        found, layout = scanned.found, scanned.layout
        block = standard_block(
            layout, found.group(2), secret.encode(), layout.metric_names(found.group(7)),
            grace_seconds and (old_secret.encode(), format_rfc3339(until).encode()),
            found.group(6))
        if block is not None:
            _replace_entry(path, raw, scanned, public_key, block, expected)
            return secret, True
        text, current = _existing_key(path, public_key)
    del raw, scanned
    new_text = _rotated_text(text, public_key, secret,
                             grace_seconds and (old_secret, format_rfc3339(until)))
    data = _data_of(path, text)
    entry = data["apikeys"][public_key]
    entry.pop("previous_secret_key", None)
    entry.pop("previous_secret_expires", None)
    entry["secret_key"] = secret
    if grace_seconds:
        entry.update(previous_secret_key=old_secret, previous_secret_expires=format_rfc3339(until))
    return secret, _replace_file(path, new_text, {**current, public_key.encode(): expected},
                                 data)


def _rotated_text(text, public_key, secret, previous):
    """A file outside the standard layout with the key's secret replaced in its lines,
    ``previous`` (the old secret, its expiry) kept if given; else the text unchanged."""
    lines = text.splitlines(keepends=True)
    first, end = _key_block(lines, public_key)
    if first is None:
        return text
    block = [line for line in lines[first:end] if not _PREVIOUS_LINE.match(line)]
    for i, line in enumerate(block):
        match = _SECRET_LINE.match(line)
        if match:
            indent = match.group(1)
            block[i:i + 1] = ["%ssecret_key: %s\n" % (indent, secret)]
            if previous:  # no grace: the old secret stops at once, nothing to keep
                block[i + 1:i + 1] = [
                    "%sprevious_secret_key: %s\n" % (indent, _yaml_scalar(previous[0])),
                    "%sprevious_secret_expires: %s\n" % (indent, previous[1])]
            break
    return "".join(lines[:first] + block + lines[end:])


def _each_key(path, mark=None):
    """(key count, exact metric names, patterns), an iterator over the keys, in file
    order, as (name, exact names, patterns, max_rate, previous_until), and the load's
    warnings.  With ``mark`` (see :func:`amproxy.authscan.scan`), a standard-layout
    file gives only the keys it marks."""
    raw = read_auth_file(path)
    scanned = scan(raw, path, mark=mark)
    if scanned is None:
        db = parse_auth_file(raw, path)
        if len(db) >= SLOW_LAYOUT_WARNING_KEYS:
            log.warning(SLOW_LAYOUT, path, len(db))
        return (len(db), db.metric_count, db.pattern_count), (
            (name.decode(), key.metric_names, key.patterns, key.max_rate, key.previous_until)
            for name, key in db.keys.items()), db.warnings

    def keys():
        for m in entries(raw, scanned, None if mark is None else scanned.marked):
            name, _, metrics, _, until, max_rate = entry_values(scanned.layout, m)
            exact, patterns, _ = split_patterns(metrics, name, path, {})
            yield name, exact, patterns, max_rate, until
    return (len(scanned), scanned.metric_count, scanned.pattern_count), keys(), \
        scanned.warnings


def describe(path):
    """Lines describing every key and what it may write; never the secrets."""
    _, keys, _ = _each_key(path)
    out = []
    for name, exact, patterns, max_rate, previous_until in keys:
        line = "%s\t%s" % (name, " ".join([*exact, *patterns]) or "(no metrics)")
        if max_rate:
            line += "\t(at most %g lines/s)" % max_rate
        if previous_until:
            line += "\t(rotating: the previous secret %s %s)" % (
                "passes until" if previous_until > time.time() else "expired",
                format_rfc3339(previous_until))
        out.append(line)
    return sorted(out)


def check(path):
    """Validate the file; return a one-line summary (raises AuthFileError).

    An exact metric name that every line would be refused for (see
    protocol.metric_problem) is logged as a warning: the file still loads.
    """
    totals, keys, shared_secrets = _each_key(path, mark=_may_have_warnings)
    warnings = []
    for name, exact, _, _, previous_until in keys:
        for metric in exact:
            problem = metric_problem(metric.encode("utf-8"))
            if problem is not None:
                warnings.append((name, "auth file %s: key %r: metric %r can never be "
                                 "written: %s" % (path, name, metric, problem)))
        if previous_until and previous_until <= time.time():
            warnings.append((name, "auth file %s: key %r: its previous secret expired at %s "
                             "and no longer passes; remove previous_secret_key and "
                             "previous_secret_expires" % (path, name,
                                                          format_rfc3339(previous_until))))
    for _, warning in sorted(warnings, key=lambda w: w[0].encode()):
        log.warning("%s", warning)
    for warning in shared_secrets:
        log.warning("%s", warning)
    return "auth file %s is valid: %d keys, %d exact metric names, %d patterns" % (
        (path,) + totals)


def _may_have_warnings(layout, m):
    """A key with a previous secret, or a metric name that the quick test does not pass."""
    return m.group(4) or not layout.names_pass(m.group(7))
