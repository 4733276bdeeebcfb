"""amproxy: an authenticating proxy for Graphite's Carbon plaintext protocol."""


def _version():
    """The version, whose one place is setup.cfg.

    An installed copy (``make install``, the Debian package) carries it in
    ``_version.py``, which ``make install`` writes; a source tree (``make venv``'s
    editable install, ``PYTHONPATH``) reads the setup.cfg beside the package; a
    copy installed by pip asks its metadata.
    """
    try:
        from ._version import version
        return version
    except ImportError:
        pass
    import configparser
    import os
    setup_cfg = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "setup.cfg")
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read(setup_cfg, encoding="utf-8")
    except configparser.Error:
        pass
    if parser.get("metadata", "name", fallback=None) == "amproxy":
        return parser.get("metadata", "version")
    try:
        from importlib.metadata import version
        return version("amproxy")
    except Exception:  # not installed by pip either
        return "unknown"


__version__ = _version()
