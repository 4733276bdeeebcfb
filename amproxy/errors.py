"""The exceptions whose message an operator reads."""


class AmproxyError(Exception):
    """An error that stops a command with one clear sentence and a non-zero exit."""


class ConfigError(AmproxyError):
    """An option, flag or config file value is wrong."""


class AuthFileError(AmproxyError):
    """The auth file is missing, unreadable or invalid."""


class CloseConnection(Exception):
    """A client connection must be closed (why has been counted and logged)."""
