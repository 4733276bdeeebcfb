"""Every option, declared once: flag, environment variable, config key, default, help.

The config file uses configargparse's ``key = value`` syntax, with the long
flag name as the key (``auth-file = /etc/amproxy/auth_file.yaml``).
Precedence: command line > environment > config file > default.  The config
file is ``--config`` (or ``AMPROXY_CONFIG``) if given, else
``/etc/amproxy/amproxy.conf`` if it exists: never both.
"""

import argparse
import ipaddress
import os
import re
import sys

import configargparse

from .errors import ConfigError
from .placement import HASH_TYPES, RELAY_METHODS, Placement, parse_destinations

DEFAULT_CONFIG_FILE = "/etc/amproxy/amproxy.conf"
LOG_LEVELS = ("all", "debug", "info", "warn", "err")
LOG_FORMATS = ("logfmt", "json")

_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "ms": 1e-3,
                   "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
# Go's units, and days (a key's rotation lasts days), which Go lacks.
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|\u00b5s|ms|s|m|h|d)")


def parse_duration(text):
    """Parse a Go duration (``5m0s``, ``90s``, ``1h30m``, ``250ms``) into seconds.

    A bare number is taken as seconds, which Go would refuse but operators expect.
    """
    text = str(text).strip()
    try:
        seconds = float(text)
    except ValueError:
        seconds = None
    if seconds is None:
        pos, seconds = 0, 0.0
        for match in _DURATION_PART.finditer(text):
            if match.start() != pos:
                break
            seconds += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
            pos = match.end()
        if pos != len(text) or not text:
            raise ValueError("%r is not a duration such as 90s, 5m0s or 1h30m" % text)
    if seconds < 0 or seconds != seconds or seconds == float("inf"):
        raise ValueError("%r is not a duration such as 90s, 5m0s or 1h30m" % text)
    return seconds


def parse_address(text):
    """Parse ``host:port`` (or ``[v6]:port``) into a (host, port) tuple."""
    host, sep, port = str(text).rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("%r is not an address such as 127.0.0.1:2003" % text)
    return host.strip("[]"), int(port)


_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text):
    """Parse a byte count with an optional K, M or G suffix (``512M``)."""
    match = re.fullmatch(r"\s*(\d+)\s*([kmg]?)i?b?\s*", str(text), re.IGNORECASE)
    if not match:
        raise ValueError("%r is not a size such as 1048576, 512M or 2G" % text)
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]


def non_negative_number(text):
    value = float(text)
    if not 0 <= value < float("inf"):
        raise ValueError("%r must be a number, 0 or more" % text)
    return value


def positive_int(text):
    value = int(text)
    if value < 1:
        raise ValueError("%r must be at least 1" % text)
    return value


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise ValueError("%r must not be negative" % text)
    return value


def ipv6_prefix_length(text):
    """A number of leading bits of an IPv6 address, 1 to 128 (``64``, not ``/64``)."""
    value = str(text).strip()
    if not (value.isdigit() and 1 <= int(value) <= 128):
        raise ValueError("%r is not an IPv6 prefix length from 1 to 128" % text)
    return int(value)


def parse_networks(text):
    """Comma-separated addresses or networks (``10.0.0.5,10.0.1.0/24``); empty: none."""
    networks = []
    for part in str(text).split(","):
        if part.strip():
            try:
                networks.append(ipaddress.ip_network(part.strip(), strict=False))
            except ValueError:
                raise ValueError("%r is not an address or network such as 10.0.0.5 or "
                                 "10.0.1.0/24" % part.strip()) from None
    return tuple(networks)


def parse_boolean(text):
    """``true``/``false`` (also yes/no, on/off, 1/0), for options that default to true."""
    value = str(text).strip().lower()
    if value in ("true", "yes", "on", "1"):
        return True
    if value in ("false", "no", "off", "0"):
        return False
    raise ValueError("%r is not true or false" % text)


def _named(func, name):
    """A type function whose own message reaches the operator (argparse would print
    only "invalid <name> value")."""
    def convert(text):
        try:
            return func(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    convert.__name__ = name
    return convert


duration = _named(parse_duration, "duration")
address = _named(parse_address, "address")
size = _named(parse_size, "size")
boolean = _named(parse_boolean, "boolean")
networks = _named(parse_networks, "networks")
prefix_length = _named(ipv6_prefix_length, "prefix length")
destinations = _named(parse_destinations, "destinations")


class Option:
    """One option: everything about it, in one place."""

    def __init__(self, flag, default, help, env=None, type=str, choices=None, live=False,
                 **extra):
        self.flag = flag
        self.default = default
        self.help = help
        self.env = env
        self.type = type
        self.choices = choices
        self.live = live  # SIGHUP applies a new value to a running server
        self.extra = extra

    @property
    def dest(self):
        return self.flag[2:].replace("-", "_")

    def add_to(self, parser):
        kwargs = dict(self.extra)
        if self.env:
            kwargs["env_var"] = self.env
        if self.type is bool:
            kwargs["action"] = "store_true"
        else:
            kwargs["type"] = self.type
            if self.choices:
                kwargs["choices"] = self.choices
        help_text = self.help
        if self.default not in (None, False, "") and "default:" not in self.help:
            help_text += " (default: %(default)s)"
        if self.live:
            help_text += "; SIGHUP applies a change"
        if self.env:
            help_text += " [env: %s]" % self.env
        parser.add_argument(self.flag, default=self.default, help=help_text, **kwargs)


AUTH_FILE = Option("--auth-file", "/etc/amproxy/auth_file.yaml", "the YAML file of keys",
                   env="AUTH_FILE")
STATS_SOCKET = Option("--stats-socket", "",
                      "a Unix socket where 'amproxy stats' reads the current totals "
                      "(default: beside the pidfile, if there is one)",
                      env="AMPROXY_STATS_SOCKET")
PIDFILE = Option("--pidfile", "", "the master's pid file: the server writes its pid there; "
                 "stats and devices find the stats socket beside it", env="AMPROXY_PIDFILE")

SERVER_OPTIONS = [
    # The original's options: same flags, variables and defaults.
    Option("--addr", "127.0.0.1:2005", "the interface and port to listen on",
           env="ADDR", type=address),
    AUTH_FILE,
    Option("--carbon-addr", "127.0.0.1:2003",
           "Carbon's plaintext receiver (LINE_RECEIVER_PORT, not a pickle port); several, "
           "comma-separated, as carbon's DESTINATIONS (host:port or host:port:instance, "
           "[v6]:port)",
           env="CARBON_ADDR", type=destinations),
    Option("--skew", "5m0s", "how far a line's timestamp may be from now, either way",
           env="MAX_SKEW", type=duration, live=True),
    Option("--log-format", "logfmt", "the format of log lines", env="AMPROXY_LOG_FORMAT",
           choices=LOG_FORMATS),
    Option("--log-level", "info", "the lowest level logged", env="AMPROXY_LOG_LEVEL",
           choices=LOG_LEVELS, live=True),
    # New in this implementation.
    Option("--workers", os.cpu_count() or 1, "how many worker processes to run",
           env="WORKERS", type=positive_int, live=True),
    Option("--auth-reload-interval", "1s",
           "how often the master checks whether the auth file changed",
           env="AMPROXY_AUTH_RELOAD_INTERVAL", type=duration, live=True),
    Option("--max-line-length", 16384,
           "the longest line accepted, in bytes; a client sending a longer one is "
           "disconnected", env="AMPROXY_MAX_LINE_LENGTH", type=positive_int, live=True),
    Option("--idle-timeout", "120s",
           "close a client connection that has sent no accepted line this long",
           env="AMPROXY_IDLE_TIMEOUT", type=duration, live=True),
    Option("--max-connections", 0,
           "client connections per worker; a worker that holds this many takes no more "
           "until one leaves, and new ones wait in the listen queue; 0: as many as the "
           "open-file limit (LimitNOFILE, ulimit -n) leaves after 128 for the worker's own use",
           env="AMPROXY_MAX_CONNECTIONS", type=non_negative_int, live=True),
    Option("--max-connections-per-source", 0,
           "client connections per worker from one source address; 0: 90%% of "
           "--max-connections, so that one address cannot take every slot while a "
           "fleet behind one NAT still fits", env="AMPROXY_MAX_CONNECTIONS_PER_SOURCE",
           type=non_negative_int, live=True),
    Option("--source-ipv6-prefix", 64,
           "the per-source limit counts an IPv6 client by this many leading bits of its "
           "address, as a host usually has a whole /64 to choose from (128: each address "
           "alone); an IPv4 address, mapped into IPv6 or not, is always one source",
           env="AMPROXY_SOURCE_IPV6_PREFIX", type=prefix_length, live=True),
    # TLS for devices on untrusted networks.
    Option("--tls-addr", None,
           "also listen here for the same line protocol inside TLS (1.2 or newer); "
           "needs --tls-cert and --tls-key", env="AMPROXY_TLS_ADDR", type=address),
    Option("--tls-cert", "", "the TLS listener's certificate chain (PEM); read again on "
           "SIGHUP", env="AMPROXY_TLS_CERT"),
    Option("--tls-key", "", "the private key of --tls-cert (PEM), readable by --user; "
           "read again on SIGHUP", env="AMPROXY_TLS_KEY"),
    Option("--tls-session-tickets", False,
           "also give TLS 1.3 devices session tickets, so that a reconnect on any worker "
           "skips the certificate's signature (TLS 1.2 devices always get theirs, inside "
           "the handshake); a TLS 1.3 ticket arrives after the handshake, and a client that "
           "closes without reading it has its connection reset and loses what it had not "
           "yet sent: turn on only for devices that read, as amproxy client does",
           env="AMPROXY_TLS_SESSION_TICKETS", type=bool, live=True),
    Option("--tls-client-ca", "",
           "require client certificates signed by this CA (PEM) on the TLS listener",
           env="AMPROXY_TLS_CLIENT_CA"),
    Option("--key-max-rate", 0,
           "lines per second a key may send when its max_rate in the auth file does "
           "not say (a burst of one second's worth; the workers share the count); "
           "0: no limit", env="AMPROXY_KEY_MAX_RATE", type=non_negative_number, live=True),
    Option("--allow-tags", False,
           "forward tagged series (name;tag=value;...); the key's metrics apply to "
           "the name", env="AMPROXY_ALLOW_TAGS", type=bool, live=True),
    Option("--buffer-size", 200000,
           "lines each worker holds in memory while Carbon is unreachable",
           env="AMPROXY_BUFFER_SIZE", type=positive_int),
    Option("--spool-dir", "",
           "where workers spill lines to disk when their memory buffer is full (one "
           "subdirectory each); empty: no spool, clients are paused instead",
           env="AMPROXY_SPOOL_DIR"),
    Option("--spool-max-bytes", "1G", "the most each worker's spool may hold",
           env="AMPROXY_SPOOL_MAX_BYTES", type=size),
    Option("--replay-rate", 0,
           "lines per second to send while catching up after an outage; 0: no limit",
           env="AMPROXY_REPLAY_RATE", type=non_negative_int, live=True),
    Option("--resend-window", "5s",
           "after the connection to Carbon breaks, send again the lines sent this "
           "long before it, which Carbon may have lost", env="AMPROXY_RESEND_WINDOW",
           type=duration, live=True),
    Option("--graceful-timeout", "30s",
           "on TERM, how long workers may finish reading clients and flushing to Carbon",
           env="AMPROXY_GRACEFUL_TIMEOUT", type=duration, live=True),
    Option("--worker-timeout", "30s",
           "kill and replace a worker that shows no sign of life for this long",
           env="AMPROXY_WORKER_TIMEOUT", type=duration, live=True),
    Option("--log-rejections", 10,
           "log at most this many rejected lines per reason per second; 0 logs none",
           env="AMPROXY_LOG_REJECTIONS", type=non_negative_int, live=True),
    # Several destinations: a Graphite cluster, as carbon-relay places metrics.
    Option("--relay-method", "consistent-hashing",
           "with several --carbon-addr: place each metric by carbon's consistent "
           "hashing, or send every line to every destination (broadcast)",
           env="AMPROXY_RELAY_METHOD", choices=RELAY_METHODS),
    Option("--hash-type", "carbon_ch", "the hash of the ring, as carbon's ROUTER_HASH_TYPE",
           env="AMPROXY_HASH_TYPE", choices=HASH_TYPES),
    Option("--replication-factor", 1,
           "how many destinations each metric goes to, as carbon's REPLICATION_FACTOR",
           env="AMPROXY_REPLICATION_FACTOR", type=positive_int),
    Option("--diverse-replicas", True,
           "replicas of a metric on different hosts, as carbon's DIVERSE_REPLICAS "
           "(true or false; default: true)", env="AMPROXY_DIVERSE_REPLICAS", type=boolean),
    Option("--proxy-protocol", False,
           "every client connection starts with a PROXY protocol header (v1 or v2, as "
           "HAProxy's send-proxy or send-proxy-v2 sends it): logs and per-source limits "
           "use the client's address it carries; a connection without one is closed",
           env="AMPROXY_PROXY_PROTOCOL", type=bool),
    Option("--proxy-protocol-from", "",
           "with --proxy-protocol: take connections only from these addresses or "
           "networks, the load balancers (comma-separated: 10.0.0.5,10.0.1.0/24), who "
           "may claim any client address; empty: loopback only (127.0.0.0/8 and ::1), "
           "a balancer on this host; 0.0.0.0/0,::/0: anyone who reaches the port",
           env="AMPROXY_PROXY_PROTOCOL_FROM", type=networks),
    # Self-metrics.
    Option("--stats-interval", "60s",
           "send amproxy's own counters to Carbon this often; 0 turns it off",
           env="AMPROXY_STATS_INTERVAL", type=duration, live=True),
    Option("--stats-prefix", "",
           "the metric prefix of the counters (default: amproxy.<host name with dots as _>)",
           env="AMPROXY_STATS_PREFIX"),
    Option("--device-silent-after", "1h",
           "a key with no line accepted for this long counts as silent: in the "
           "devices.silent self-metric and for 'amproxy devices'",
           env="AMPROXY_DEVICE_SILENT_AFTER", type=duration, live=True),
    Option("--stats-per-key", False,
           "also count forwarded and rejected lines per public key",
           env="AMPROXY_STATS_PER_KEY", type=bool),
    STATS_SOCKET,
    # Running as a daemon.
    Option("--log-file", "", "log to this file instead of stderr; reopened on SIGUSR1",
           env="AMPROXY_LOG_FILE"),
    PIDFILE,
    Option("--daemon", False, "detach from the terminal and run in the background",
           env="AMPROXY_DAEMON", type=bool),
    Option("--user", "", "after binding, run as this user", env="AMPROXY_USER"),
    Option("--group", "", "after binding, run as this group (default: the user's)",
           env="AMPROXY_GROUP"),
]

# What ``amproxy route`` reads, from the same flags, environment and config file.
ROUTE_OPTIONS = [option for option in SERVER_OPTIONS if option.dest in (
    "carbon_addr", "relay_method", "hash_type", "replication_factor", "diverse_replicas")]

# What SIGHUP can change in a running server; the rest needs a restart.
LIVE_OPTIONS = tuple(option.dest for option in SERVER_OPTIONS if option.live)


def stats_socket_path(options):
    if options.stats_socket:
        return options.stats_socket
    if options.pidfile:
        return os.path.splitext(options.pidfile)[0] + ".stats.sock"
    return ""


CONFIG_OPTION = Option("--config", None,
                       "a config file of 'option = value' lines, read instead of %s "
                       "(which is read when it exists)" % DEFAULT_CONFIG_FILE,
                       env="AMPROXY_CONFIG", is_config_file=True)


KEY_PRIVATE = Option("--key-private", None, "the secret key to sign with",
                     env="KEY_PRIVATE")
KEY_PUBLIC = Option("--key-public", None, "the public key to send", env="KEY_PUBLIC")
SERVER_ADDR = Option("--server-addr", "127.0.0.1:2005", "amproxy's address",
                     env="SERVER_ADDR", type=address)
# A client's TLS: the server's CA, and a certificate of its own for mutual TLS.
CLIENT_TLS_OPTIONS = [
    Option("--tls", False, "connect with TLS (to the server's --tls-addr)",
           env="AMPROXY_CLIENT_TLS", type=bool),
    Option("--ca-file", "", "the CA that signed the server's certificate (PEM; default: "
           "the system's CAs)", env="AMPROXY_CA_FILE"),
    Option("--client-cert", "", "this client's certificate, for a server with "
           "--tls-client-ca (PEM)", env="AMPROXY_CLIENT_CERT"),
    Option("--client-key", "", "the private key of --client-cert (PEM)",
           env="AMPROXY_CLIENT_KEY"),
]
TEST_CLIENT_OPTIONS = [
    KEY_PUBLIC, KEY_PRIVATE,
    Option("--metric", "metric1", "the metric to send", env="METRIC_NAME"),
    SERVER_ADDR,
    Option("--interval", "1m", "the time between data points", env="INTERVAL",
           type=duration),
    Option("--count", None, "stop after this many data points (default: never)",
           env="AMPROXY_COUNT", type=positive_int),
] + CLIENT_TLS_OPTIONS


class _RaisingParser(configargparse.ArgumentParser):
    """For re-reading options in a running server: raise instead of exiting."""

    def error(self, message):
        raise ConfigError(message)


def build_parser(prog, description, options, raise_errors=False, **kwargs):
    parser_class = _RaisingParser if raise_errors else configargparse.ArgumentParser
    # No abbreviations: "--conf" must not read both config files.
    parser = parser_class(prog=prog, description=description, add_config_file_help=False,
                          add_env_var_help=False, allow_abbrev=False, **kwargs)
    for option in options:
        option.add_to(parser)
    return parser


def _explicit_config(argv):
    """The config file that --config (or else AMPROXY_CONFIG) names, or None."""
    flag = CONFIG_OPTION.flag
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg[len(flag) + 1:]
    return os.environ.get(CONFIG_OPTION.env) or None


def config_files(argv):
    """The default config file, unless --config or AMPROXY_CONFIG names another.

    configargparse would read both; an explicit file must replace the default,
    or a test, a second instance or ``--config /dev/null`` inherits the host's.
    """
    return [] if _explicit_config(argv) else [DEFAULT_CONFIG_FILE]


def config_file_path(argv):
    """The config file the server reads, for messages."""
    return _explicit_config(argv) or DEFAULT_CONFIG_FILE


def config_parser(prog, description, options, argv, raise_errors=False):
    """A parser that also reads the config file, as the server does.

    Commands that need only some options (``stats``, ``keys``) skip the
    config file's other keys instead of refusing them.
    """
    return build_parser(
        prog, description, [CONFIG_OPTION] + options, raise_errors=raise_errors,
        default_config_files=config_files(argv),
        ignore_unknown_config_file_keys=options is not SERVER_OPTIONS,
        epilog="Each option can also be set by its environment variable, or in the "
               "config file as 'option = value' (without the dashes). A flag beats the "
               "environment, which beats the file, which beats the default.")


SERVER_DESCRIPTION = "Accept signed Carbon lines, verify them and forward the good ones " \
    "to Carbon."


def parse_server_args(argv):
    """Parse ``amproxy server`` options; exit with status 2 and one line on a bad one.

    The line names the config file: a bad option may come from there.
    """
    try:
        return reread_server_args(argv)
    except ConfigError as e:
        sys.stderr.write("amproxy server: error: %s (in the command line, the environment "
                         "or %s); see 'amproxy server --help'\n" % (e, config_file_path(argv)))
        raise SystemExit(2) from None


def reread_server_args(argv):
    """Parse the options again (the config file may have changed); raise ConfigError."""
    options = config_parser("amproxy server", SERVER_DESCRIPTION, SERVER_OPTIONS, argv,
                            raise_errors=True).parse_args(argv)
    check_options(options)
    return options


def reload_server_args(options, argv):
    """Parse the options again and take the live ones into ``options``: (the live
    options that changed, those that changed but wait for a restart).  ConfigError if
    the config no longer parses, and then nothing changes."""
    new = reread_server_args(argv)
    changed = sorted(name for name, value in vars(new).items()
                     if getattr(options, name, None) != value)
    for name in changed:
        if name in LIVE_OPTIONS:
            setattr(options, name, getattr(new, name))
    return ([name for name in changed if name in LIVE_OPTIONS],
            [name for name in changed if name not in LIVE_OPTIONS])


def check_options(options):
    """The checks across options, in one place: ConfigError for a combination that
    cannot run; the warnings (sentences) for one that runs but may surprise."""
    if options.tls_addr and not (options.tls_cert and options.tls_key):
        raise ConfigError("--tls-addr needs --tls-cert and --tls-key")
    warnings = list(Placement.from_options(options).warnings())
    if options.daemon and not options.log_file:
        warnings.append("running as a daemon without --log-file: nothing will be logged")
    if len(options.carbon_addr) > 1 and not options.spool_dir:
        warnings.append("several Carbon destinations and no --spool-dir: when one is down "
                        "and its --buffer-size lines are held, reading stops for all of them")
    return warnings
