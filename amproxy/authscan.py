"""The auth file's standard layout, read in place: one regex match per key.

This is the layout ``amproxy keys`` writes, and the one of the large files
that fleets generate::

    apikeys:
      NAME:
        secret_key: SECRET
        previous_secret_key: SECRET         # these two only in a rotation
        previous_secret_expires: TIME
        max_rate: NUMBER                    # optional
        metrics:
          - METRIC

with blank and comment lines between keys, any indentation used alike
throughout, and ``metrics: []``.  Scanning it makes no object per metric, where
the YAML parser makes several (the README's Performance section has the
figures).  Any other layout
(another order of the fields, a comment inside a key, quotes, flow style,
tabs...) is not the standard layout, and the caller reads that file with
:func:`amproxy.auth.parse_auth_file` instead.  Every value here is a plain
scalar that YAML's base schema reads as the same string, so what is
accepted means exactly what YAML would read.  (A metric that YAML needs
quoted, such as ``'*.temp'``, is single-quoted.)
"""

import re
from array import array
from zlib import crc32

from .auth import (MAX_FIELD_BYTES, RFC3339_TEXT, SecretOwners, parse_max_rate,
                   parse_previous_secret, parse_rfc3339, split_patterns)
from .errors import AuthFileError
from .protocol import MAX_LAST_NODE_BYTES, PLAIN_NAME

# A plain scalar that YAML's base schema reads as the same string: it may not
# start with an indicator, except "-" or "?" right before another character
# (secrets in URL-safe base64 start with "-" now and then).
_SAFE = rb"A-Za-z0-9_./+=@~^%*?"  # and "-", put last in each class
_START_CHAR = rb"(?:[A-Za-z0-9_./+=~^]|[-?](?=[" + _SAFE + rb"-]))"
# A value longer than MAX_FIELD_BYTES is not the standard layout: the full parse
# refuses it, with the message that says so.
_MORE = rb"{0,%d}" % (MAX_FIELD_BYTES - 1)
_PLAIN = _START_CHAR + rb"[" + _SAFE + rb"-]" + _MORE
# YAML takes a key of at most 1024 characters without the "? " form.
_NAME = rb"(?=[^:\n]{1,1024}:)" + _PLAIN
# A metric item may also hold the flow indicators ,[]{} (Graphite patterns): in
# block context YAML reads them as part of a plain scalar, except first.  One
# that starts with a character YAML reserves ('*.temp') is single-quoted, as
# `keys new` writes it: printable ASCII, no space, no quote inside.
_PLAIN_ITEM = _START_CHAR + rb"[" + _SAFE + rb",\[\]{}-]" + _MORE
_QUOTED_ITEM = rb"'[\x21-\x26\x28-\x7e]{1,%d}'" % MAX_FIELD_BYTES
_ITEM = rb"(?:%s|%s)" % (_PLAIN_ITEM, _QUOTED_ITEM)
_WRITTEN_AS_IS = re.compile(_PLAIN_ITEM).fullmatch
_QUOTE = ord("'")
# Blank lines and comments of printable ASCII (YAML refuses control characters).
_SKIP = rb"(?:[ ]*(?:#[\t\x20-\x7e]*)?\n)*"
_START = re.compile(_SKIP + rb"(?:---\n" + _SKIP + rb")?apikeys:\n")
_FIRST_KEY = re.compile(_SKIP + rb"( +)" + _PLAIN + rb":\n( +)secret_key: ")
_FIRST_ITEM = re.compile(rb"^( +- )", re.MULTILINE)
_END = re.compile(_SKIP + rb"\Z")
GLOB_BYTES = re.compile(rb"[*?\[\]{}]")


def block_regex(key_indent, field_indent, item_prefix, name, value, time, item):
    """One key's entry.  Groups: 1 the entry from its key line on, 2 the name,
    3 the secret, 4 the previous secret, 5 its expiry, 6 max_rate, 7 the items."""
    k, f, p = key_indent, field_indent, item_prefix
    return re.compile(
        _SKIP + rb"(" + k + rb"(" + name + rb"):\n" +
        f + rb"secret_key: +(" + value + rb")\n"
        rb"(?:" + f + rb"previous_secret_key: +(" + value + rb")\n" +
        f + rb"previous_secret_expires: +(" + time + rb")\n)?"
        rb"(?:" + f + rb"max_rate: +(" + value + rb")\n)?" +
        f + rb"metrics:(?: \[\]\n|\n((?:" + p + item + rb"\n)+)))")


class Layout:
    """The indentation of one file: of its key lines, field lines and metric items."""

    def __init__(self, key_indent, field_indent, item_prefix):
        self.key_indent = key_indent
        self.field_indent = field_indent
        self.item_prefix = item_prefix
        self.block = block_regex(key_indent, field_indent, item_prefix, _NAME, _PLAIN,
                                 RFC3339_TEXT.encode(), _ITEM)
        self._names_pass = None

    def names_pass(self, items):
        """Whether every item is a metric name carbon stores as written (the quick
        test of :func:`amproxy.protocol.metric_problem`): one match per entry."""
        if self._names_pass is None:
            self._names_pass = re.compile(rb"(?:%s(?=[^\n]{1,%d}\n)%s\n)*" % (
                self.item_prefix, MAX_LAST_NODE_BYTES, PLAIN_NAME)).fullmatch
        return items is None or self._names_pass(items) is not None

    def metric_names(self, items):
        """The metric names (bytes) of an entry's items (group 7)."""
        if not items:
            return []
        names = items[len(self.item_prefix):-1].split(b"\n" + self.item_prefix)
        if b"'" in items:  # a plain item holds none
            names = [n[1:-1] if n[0] == _QUOTE else n for n in names]
        return names


class Scan:
    """What a scan found: each key's entry offset and name hash, in file order, and totals.

    ``found`` is the match of the key asked for (``want``), if the file has it.
    """

    def __init__(self, layout):
        self.layout = layout
        self.offsets = array("Q")  # of each key line
        self.hashes = array("L")  # crc32 of each name
        self.metric_count = 0
        self.pattern_count = 0
        self.rate_limited = False
        self.rate_total = 0.0  # lines/s of the keys with a max_rate, together
        self.found = None
        self.marked = []
        self.warnings = []  # about keys that share a secret

    def __len__(self):
        return len(self.offsets)


def scan(data, path, want=None, mark=None):
    """Scan ``data`` (the file's bytes): a :class:`Scan`, or None if not the standard
    layout.  ``mark(layout, match)``, if given, is asked about every entry; the offsets
    of those it is true for are in ``marked``.  Raises AuthFileError, with the message
    the YAML path gives, for a file in the standard layout whose values are invalid."""
    layout, pos = _layout_of(data)
    if layout is None:
        return None
    result = Scan(layout)
    match = layout.block.match
    add_offset, add_hash = result.offsets.append, result.hashes.append
    names = set()
    owners = SecretOwners()
    owner_of = owners.owners.setdefault
    compiled = {}  # pattern matchers, shared by keys with the same patterns
    error = None
    # Where glob characters are (in most files, nowhere): an entry is searched for
    # patterns only if one lies before its end.
    globs = _positions(data, b"*?[]{}", pos)
    next_glob = 0
    # The loop runs once per key: keep it lean (it is most of the time of a reload).
    while True:
        m = match(data, pos)
        if m is None:
            break
        pos = m.end()
        _, name, secret, previous, _, rate, items = m.groups()
        if name in names:
            return None  # the full parse refuses it, with both lines
        names.add(name)
        if owner_of(secret, name) is not name:  # inline: once per key of a fleet's file
            owners.add(name, secret)
        add_offset(m.start(1))
        add_hash(crc32(name))
        if name == want:
            result.found = m
        if mark is not None and mark(result.layout, m):
            result.marked.append(m.start(1))
        if globs[next_glob] < pos:
            while globs[next_glob] < pos:
                next_glob += 1
            patterns = items and GLOB_BYTES.search(items)
        else:
            patterns = False
        if previous or rate or patterns:
            invalid = _check_entry(result, m, path, compiled, owners)
            error = error or invalid  # raised if the rest of the file is the standard layout
    return _finished(result, data, pos, error, owners, path) if names else None


def _finished(result, data, pos, error, owners, path):
    """The scan, if the file ends at ``pos`` (else it is not the standard layout)."""
    if not _END.match(data, pos):
        return None
    if error is not None:
        raise error
    result.warnings = owners.warnings(path)
    # Every line that starts with the item prefix is an item in this layout.
    result.metric_count = data.count(b"\n" + result.layout.item_prefix) - result.pattern_count
    return result


def _layout_of(data):
    """(the file's :class:`Layout`, where its first key starts), or (None, 0) if it
    does not start as the standard layout does."""
    start = _START.match(data)
    if start is None or not data.endswith(b"\n"):
        return None, 0
    first = _FIRST_KEY.match(data, start.end())
    item = _FIRST_ITEM.search(data, start.end())
    if first is None:
        return None, 0
    key_indent, field_indent = first.groups()
    item_prefix = item.group(1) if item else field_indent + b"- "
    if not len(key_indent) < len(field_indent) <= len(item_prefix) - 2:
        return None, 0
    return Layout(key_indent, field_indent, item_prefix), start.end()


def _positions(data, chars, start):
    """Where any of ``chars`` is in ``data`` from ``start`` on, sorted, then len(data).

    bytes.find runs at memory speed, where a regex search for a character class
    would take a fifth of a second on a fleet's file."""
    found = []
    for char in chars:
        i = data.find(char, start)
        while i >= 0:
            found.append(i)
            i = data.find(char, i + 1)
    found.sort()
    found.append(len(data))
    return found


def _check_entry(result, m, path, compiled, owners):
    """Validate what the regex cannot (an entry with a previous secret, a rate or
    patterns), in the order parse_auth_data does, and count it; the AuthFileError
    if it is invalid, else None."""
    layout, previous, rate = result.layout, m.group(4), m.group(6)
    if previous:
        owners.add(m.group(2), previous)
    result.rate_limited = result.rate_limited or rate is not None
    name = m.group(2).decode()
    metrics = [n.decode() for n in layout.metric_names(m.group(7))]
    entry = {}
    if previous:
        entry.update(previous_secret_key=previous.decode(),
                     previous_secret_expires=m.group(5).decode())
    if rate:
        entry["max_rate"] = rate.decode()
    try:
        _, patterns, _ = split_patterns(metrics, name, path, compiled)
        parse_previous_secret(entry, name, path)
        result.rate_total += parse_max_rate(entry, name, path)
    except AuthFileError as e:
        return e
    result.pattern_count += len(patterns)
    return None


def entry_values(layout, m):
    """A matched entry's values: (name, secret, metric names, previous secret or
    None, its expiry as Unix time or 0, max_rate or 0.0)."""
    previous = m.group(4).decode() if m.group(4) else None
    return (m.group(2).decode(), m.group(3).decode(),
            [name.decode() for name in layout.metric_names(m.group(7))], previous,
            parse_rfc3339(m.group(5).decode()) if previous else 0,
            float(m.group(6)) if m.group(6) else 0.0)


def entries(data, scanned, offsets=None):
    """The match of every key's entry (or those at ``offsets``), in file order."""
    match = scanned.layout.block.match
    for offset in scanned.offsets if offsets is None else offsets:
        yield match(data, offset)


def standard_block(layout, name, secret, metrics, previous=None, max_rate=None):
    """A key's entry (bytes) in the file's layout; None if a value would need quotes.

    All values are bytes; ``previous`` is (previous secret, expiry as RFC 3339).
    """
    block = entry_block(layout, name, secret, metrics, previous, max_rate)
    return block if layout.block.fullmatch(block) else None


def entry_block(layout, name, secret, metrics, previous=None, max_rate=None, quote=None):
    """A key's entry (bytes) in ``layout``, the one writer of an entry: for a file in
    the standard layout (:func:`standard_block`, which checks it), for one in another
    (``quote``: how a metric is written there) and for the snapshot (escaped values)."""
    field = layout.field_indent
    lines = [layout.key_indent + name + b":\n", field + b"secret_key: " + secret + b"\n"]
    if previous:
        lines += [field + b"previous_secret_key: " + previous[0] + b"\n",
                  field + b"previous_secret_expires: " + previous[1] + b"\n"]
    if max_rate is not None:
        lines.append(field + b"max_rate: " + max_rate + b"\n")
    lines.append(field + (b"metrics:\n" if metrics else b"metrics: []\n"))
    quote = quote or _quoted_if_needed
    lines += [layout.item_prefix + quote(metric) + b"\n" for metric in metrics]
    return b"".join(lines)


def _quoted_if_needed(metric):
    """As the standard layout holds a metric: plain, or in single quotes ('*.temp')."""
    return metric if _WRITTEN_AS_IS(metric) else b"'%s'" % metric


def count_entries(data, layout, want=None):
    """(number of entries, the match of ``want`` or None) if ``data`` is wholly in
    ``layout``, else None: the grammar alone, for reading back a file just written."""
    start = _START.match(data)
    if start is None:
        return None
    match = layout.block.match
    count, found, pos = 0, None, start.end()
    while True:
        m = match(data, pos)
        if m is None:
            break
        pos = m.end()
        count += 1
        if m.group(2) == want:
            found = m
    return (count, found) if _END.match(data, pos) else None
