"""The auth file: load and validate it into an immutable lookup, and reload it.

A new lookup replaces the old one only once it is completely built and valid,
so a half-written or broken file never takes keys away from running devices.
"""

import logging
import os
import stat

import yaml

from .errors import AuthFileError
from .protocol import Signer

log = logging.getLogger(__name__)

_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class AuthKey(Signer):
    """One device key: how to check its signatures and which metrics it may write."""

    __slots__ = ("name", "metrics")

    def __init__(self, name, secret, metrics):
        super().__init__(secret)
        self.name = name
        self.metrics = frozenset(m.encode("utf-8") for m in metrics)

    def allows_pattern(self, metric):
        return False

    def allows(self, metric):
        return metric in self.metrics or self.allows_pattern(metric)


class AuthDB:
    """Public key (bytes) -> :class:`AuthKey`, as read from one version of the file."""

    def __init__(self, keys, source=None):
        self.keys = {k.name.encode("utf-8"): k for k in keys}
        self.source = source

    def __len__(self):
        return len(self.keys)

    def get(self, public_key, default=None):
        return self.keys.get(public_key, default)

    @property
    def metric_count(self):
        return sum(len(k.metrics) for k in self.keys.values())


def _scalar_text(value):
    """YAML turns ``12345`` into an int; accept that, but not bools, lists or maps."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def parse_auth_data(data, path):
    """Validate the parsed YAML document ``data`` and build an :class:`AuthDB`."""
    if not isinstance(data, dict) or not isinstance(data.get("apikeys"), dict):
        raise AuthFileError("auth file %s must contain a mapping named 'apikeys'" % path)
    keys = []
    for raw_name, entry in data["apikeys"].items():
        name = _scalar_text(raw_name)
        if not name or any(c.isspace() for c in name):
            raise AuthFileError("auth file %s: public key %r must be a non-empty string "
                                "without spaces" % (path, raw_name))
        if not isinstance(entry, dict):
            raise AuthFileError("auth file %s: key %r must be a mapping with secret_key "
                                "and metrics" % (path, name))
        secret = _scalar_text(entry.get("secret_key"))
        if not secret:
            raise AuthFileError("auth file %s: key %r has no secret_key" % (path, name))
        metrics = entry.get("metrics")
        if not isinstance(metrics, list):
            raise AuthFileError("auth file %s: key %r: metrics must be a list of metric "
                                "names" % (path, name))
        for metric in metrics:
            if not isinstance(metric, str) or not metric or any(c.isspace() for c in metric):
                raise AuthFileError("auth file %s: key %r: metric %r must be a non-empty "
                                    "string without spaces" % (path, name, metric))
        keys.append(AuthKey(name, secret, metrics))
    return AuthDB(keys, source=path)


def load_auth_file(path):
    """Read, parse and validate the auth file at ``path``; raise AuthFileError."""
    try:
        with open(path, "rb") as f:
            data = yaml.load(f, Loader=_YAML_LOADER)
    except OSError as e:
        raise AuthFileError("cannot read auth file %s: %s" % (path, e.strerror or e)) from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = " at line %d" % (where.line + 1) if where is not None else ""
        raise AuthFileError("auth file %s is not valid YAML%s" % (path, line)) from None
    return parse_auth_data(data, path)


def _file_identity(path):
    """What changes when the file is rewritten in place or replaced by a rename."""
    st = os.stat(path)
    return (st.st_ino, st.st_dev, st.st_mtime_ns, st.st_size)


def warn_if_world_readable(path):
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if mode & stat.S_IROTH:
        log.warning("auth file %s can be read by every user; it holds secret keys, "
                     "so chmod o-r it", path, extra={"file": path})


class AuthFile:
    """The current :class:`AuthDB` for one file, reloaded when the file changes."""

    def __init__(self, path):
        self.path = path
        self._identity = None
        self.db = None
        self.reloads = 0
        self.reload_errors = 0

    def load(self):
        """First load: an error here is fatal, so it propagates."""
        self._identity = self._current_identity()
        self.db = load_auth_file(self.path)
        return self.db

    def _current_identity(self):
        try:
            return _file_identity(self.path)
        except OSError:
            return None

    def changed(self):
        return self._current_identity() != self._identity

    def reload(self, reason):
        """Load the file again; on error keep the previous keys and log why."""
        self._identity = self._current_identity()
        try:
            db = load_auth_file(self.path)
        except AuthFileError as e:
            self.reload_errors += 1
            log.error("%s; keeping the %d keys loaded before", e, len(self.db),
                      extra={"file": self.path})
            return False
        self.db = db
        self.reloads += 1
        log.info("auth file reloaded", extra={"file": self.path, "keys": len(db),
                                              "reason": reason})
        return True

    def reload_if_changed(self):
        if self.changed():
            return self.reload("file changed")
        return False
