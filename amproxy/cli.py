"""The ``amproxy`` command."""

import contextlib
import json
import logging
import os
import socket
import ssl
import stat
import sys
import time

from . import __version__
from . import deviceview, handover, keytool
from .auth import format_rfc3339, shown, warn_if_world_readable
from .client import Client, format_address, run_test_client
from .config import (AUTH_FILE, CLIENT_TLS_OPTIONS, KEY_PRIVATE, KEY_PUBLIC, PIDFILE, ROUTE_OPTIONS, SERVER_ADDR,
                     STATS_SOCKET, TEST_CLIENT_OPTIONS, build_parser, config_parser, duration,
                     parse_server_args, stats_socket_path)
from .errors import AmproxyError
from .logs import setup_logging
from .master import Master
from .placement import Placement
from .tls import client_context
from .protocol import sign

log = logging.getLogger("amproxy")

USAGE = """usage: amproxy COMMAND [options]

commands:
  server                      run the proxy
  client signature TEXT       print the signature of TEXT (secret from --key-private
                              or KEY_PRIVATE)
  client test-client          send a random data point every --interval
  client send METRIC VALUE [TIMESTAMP]
                              send one signed data point (for cron jobs and checks)
  keys new KEY --metric M...  add a key with a new secret to the auth file
  keys list                   show the keys and what they may write (no secrets)
  keys revoke KEY             remove a key from the auth file
  keys rotate KEY [--grace 7d]
                              give a key a new secret (printed once); the old one
                              still passes until the grace period ends
  auth-file check [FILE]      validate an auth file; non-zero exit on errors
  route [METRIC...]           print where each metric goes: its Carbon destinations,
                              as carbon's router places it (names from stdin if none)
  stats                       print a running server's totals (through --stats-socket,
                              or the one beside --pidfile; reads the server's config)
  devices [--silent 1h] [--rejected] [--key KEY]
                              list a running server's keys: when each last sent an
                              accepted line, from where, and why one is silent
                              (through the stats socket, as stats)

Run 'amproxy COMMAND --help' for a command's options.
"""


def cmd_server(argv):
    handover.report_to_predecessor()  # before anything can fail
    options = parse_server_args(argv)
    try:
        setup_logging(options.log_format, options.log_level, options.log_file)
    except OSError as e:
        raise AmproxyError("cannot open log file %s: %s" % (options.log_file, e.strerror)) \
            from None
    try:
        return Master(options, argv).run()
    except AmproxyError as e:
        log.error(str(e))  # to the log file too, which may be all a daemon has
        return 1


def cmd_client_signature(argv):
    parser = build_parser("amproxy client signature",
                          "Print the base64 signature of a line's signed text.",
                          [KEY_PRIVATE])
    parser.add_argument("text", help='the signed text: "metric value timestamp public_key"')
    args = parser.parse_args(argv)
    if not args.key_private:
        raise AmproxyError("no secret key: pass --key-private or set KEY_PRIVATE")
    _check_signed_text(args.text)
    print(sign(args.key_private, args.text))
    return 0


def _check_signed_text(text):
    """Refuse what the proxy would reject as malformed, as the original's command does."""
    fields = text.split(" ")
    if len(fields) != 4 or not all(fields):
        raise AmproxyError('%r is not "metric value timestamp public_key" (4 fields '
                           'separated by single spaces), so it cannot be signed' % text)
    timestamp = fields[2]
    if not (timestamp.isascii() and timestamp.isdigit()):
        raise AmproxyError('the timestamp %r in %r is not whole Unix seconds, so it is not '
                           '"metric value timestamp public_key" and cannot be signed'
                           % (timestamp, text))


def cmd_client_test_client(argv):
    parser = build_parser("amproxy client test-client",
                          "Send one signed random value (30 to 100) every interval, "
                          "over a new connection each time.", TEST_CLIENT_OPTIONS)
    args = parser.parse_args(argv)
    if not args.key_public or not args.key_private:
        raise AmproxyError("the test client needs --key-public and --key-private "
                           "(or KEY_PUBLIC and KEY_PRIVATE)")
    setup_logging()
    run_test_client(args.server_addr, args.key_public, args.key_private, args.metric,
                    args.interval, args.count, **_client_tls(args))
    return 0


def _keys_parser(prog, description, argv):
    """The auth file comes from the flag, AUTH_FILE or the config file, as for the server."""
    return config_parser(prog, description, [AUTH_FILE], argv)


LAYOUT_LOST = ("note: %s did not have the usual layout, so it was rewritten from its "
               "data; its comments are gone")


def cmd_keys_new(argv):
    parser = _keys_parser("amproxy keys new", "Add a key with a new random secret.", argv)
    parser.add_argument("public_key", help="the new key's name, which devices send as "
                        "the line's public_key")
    parser.add_argument("--metric", action="append", required=True, metavar="PATTERN",
                        help="a metric name or Graphite pattern the key may write "
                        "(repeat for more)")
    args = parser.parse_args(argv)
    secret, kept_layout = keytool.add_key(args.auth_file, args.public_key, args.metric)
    if not kept_layout:
        print(LAYOUT_LOST % args.auth_file, file=sys.stderr)
    print("added %s to %s; its secret key (shown only now):" % (
        args.public_key, args.auth_file), file=sys.stderr)
    print(secret)
    return 0


def cmd_keys_list(argv):
    args = _keys_parser("amproxy keys list", "Show keys and what they may write.",
                        argv).parse_args(argv)
    for line in keytool.describe(args.auth_file):
        print(line)
    return 0


def cmd_keys_revoke(argv):
    parser = _keys_parser("amproxy keys revoke", "Remove a key from the auth file.", argv)
    parser.add_argument("public_key", help="the key to remove")
    args = parser.parse_args(argv)
    if not keytool.revoke_key(args.auth_file, args.public_key):
        print(LAYOUT_LOST % args.auth_file, file=sys.stderr)
    print("revoked %s in %s" % (args.public_key, args.auth_file), file=sys.stderr)
    return 0


def cmd_keys_rotate(argv):
    parser = _keys_parser("amproxy keys rotate", "Give a key a new random secret; the "
                          "current one stays valid as its previous secret for the grace "
                          "period, so that devices can be updated one by one.", argv)
    parser.add_argument("public_key", help="the key to rotate")
    parser.add_argument("--grace", type=duration, default="7d",
                        help="how long the old secret still passes (default: 7d)")
    args = parser.parse_args(argv)
    setup_logging()  # for the warning when a previous secret still in use is dropped
    now = time.time()
    secret, kept_layout = keytool.rotate_key(args.auth_file, args.public_key, args.grace, now)
    if not kept_layout:
        print(LAYOUT_LOST % args.auth_file, file=sys.stderr)
    old = ("the old secret passes until %s" % format_rfc3339(now + args.grace)
           if args.grace else "the old secret no longer passes")
    print("rotated %s in %s; %s; the new secret key (shown only now):" % (
        args.public_key, args.auth_file, old), file=sys.stderr)
    print(secret)
    return 0


def cmd_auth_file_check(argv):
    parser = _keys_parser("amproxy auth-file check", "Validate an auth file.", argv)
    parser.add_argument("file", nargs="?", help="the file to check (default: the server's "
                        "auth file, from --auth-file, AUTH_FILE or the config file)")
    args = parser.parse_args(argv)
    path = args.file or args.auth_file
    setup_logging()
    print(keytool.check(path))
    warn_if_world_readable(path)
    return 0


def cmd_stats(argv):
    options = config_parser("amproxy stats", "Print a running server's totals since it "
                            "started, as JSON.", [STATS_SOCKET, PIDFILE], argv).parse_args(argv)
    answer = _read_totals(options)
    print(json.dumps(answer, indent=2, sort_keys=True))
    return 0


@contextlib.contextmanager
def _stats_socket(options, request, what):
    """The running server's stats socket, ``request`` (bytes, or None) sent, then the
    sending side shut, so that the server sees where the request ends.  An error of
    the socket, in the ``with`` block too, is one sentence naming it."""
    path = stats_socket_path(options)
    if not path:
        raise AmproxyError("no stats socket: pass --stats-socket or --pidfile (or set them "
                           "in the config file)")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(path)
            try:
                if request:
                    sock.sendall(request)
                sock.shutdown(socket.SHUT_WR)
            except OSError:  # a server that answers without reading may have closed
                pass
            yield sock
    except OSError as e:
        raise AmproxyError("cannot read %s from %s: %s%s" % (
            what, path, e.strerror or e, _socket_hint(path, e))) from None


def _socket_hint(path, error):
    """What an operator checks next, for a stats socket that does not answer."""
    if isinstance(error, (FileNotFoundError, ConnectionRefusedError)):
        if os.path.exists(path) and not stat.S_ISSOCK(os.stat(path).st_mode):
            return " (it is not a socket: is that the stats socket's path?)"
        return " (is amproxy running, with this stats socket?)"
    return ""


def _read_totals(options):
    """The server's totals, as JSON (``amproxy stats``)."""
    chunks = []
    with _stats_socket(options, None, "stats") as sock:
        while True:
            chunk = _receive(sock, chunks)
            if not chunk:
                break
            chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except ValueError:
        raise AmproxyError("the server on %s did not answer with JSON (%d bytes): is it "
                           "amproxy's stats socket?" % (stats_socket_path(options),
                                                        sum(map(len, chunks)))) from None


def cmd_devices(argv):
    parser = config_parser(
        "amproxy devices", "List a running server's keys, as the devices behind them: "
        "when each last sent a line that was accepted, whether it is connected and from "
        "where, and, for one that is silent or whose lines are rejected, why (clock off, "
        "old or wrong secret, metrics it may not write, over its rate, malformed lines, "
        "never seen). Asks the server through its stats socket, as stats does.",
        [STATS_SOCKET, PIDFILE], argv)
    parser.add_argument("--silent", type=duration, metavar="DURATION",
                        help="only the keys with nothing accepted for this long (90s, "
                        "5m0s, 1h30m, 7d), those never seen since the server started "
                        "included; it is also the window of the summary line")
    parser.add_argument("--rejected", action="store_true",
                        help="only the keys failing now: every line since their last "
                        "accepted one was rejected")
    parser.add_argument("--key", metavar="KEY", help="only this key")
    parser.add_argument("--sort", choices=deviceview.SORTS, default="key",
                        help="the order (default: key): key, by name; last-accepted, "
                        "the longest silent first, never-seen keys before all; "
                        "last-rejected, the latest rejection first, never-rejected keys "
                        "last; rejected, the most rejected lines first")
    parser.add_argument("--format", choices=deviceview.FORMATS, default="table",
                        help="the output (default: table): table, aligned columns and a "
                        "summary line; json, the list of devices as one JSON document, "
                        "one device a line, each with every field of its state")
    args = parser.parse_args(argv)
    if args.silent is not None and args.silent > deviceview.MAX_SILENT:
        parser.error("argument --silent: at most %dd" % (deviceview.MAX_SILENT // 86400))
    query = deviceview.Query(args.silent, args.rejected, args.key, args.sort, args.format)
    path = stats_socket_path(args)
    with _stats_socket(args, deviceview.request_line(query), "devices") as sock:
        header = _devices_header(sock, path)
        # All of it before any is written: whoever reads our output must not hold up
        # the server (which gives up after a while) nor get a cut answer.
        body = _read_to_end(sock, header.pop("rest"))
    if len(body) != header.get("bytes", len(body)):
        raise AmproxyError("the answer from %s ended early (%d of %d bytes); try again"
                           % (path, len(body), header["bytes"]))
    if args.key is not None and not header["devices"] and args.silent is None \
            and not args.rejected:
        raise AmproxyError("the server has no key %s (amproxy keys list shows the keys "
                           "of its auth file)" % shown(args.key))
    _write_out(body)
    return 0


def _read_to_end(sock, data):
    chunks = [data]
    while True:
        chunk = sock.recv(1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _write_out(body):
    """The answer to stdout; a reader that went away (| head) ends it quietly."""
    try:
        out = getattr(sys.stdout, "buffer", None)
        if out is None:
            sys.stdout.write(body.decode("utf-8", "replace"))
        else:
            out.write(body)
        sys.stdout.flush()
    except BrokenPipeError:
        # Python would say so again at exit, flushing: point stdout at nothing.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except OSError as e:
        raise AmproxyError("cannot write the devices out: %s" % (e.strerror or e)) from None


def _receive(sock, received):
    """What comes next; b"" at the end.  Linux resets the reader when the server
    closes with the request unread (a server from before requests): then what it
    sent before closing (``received``, a list of what came so far) is all there is."""
    try:
        return sock.recv(65536)
    except ConnectionResetError:
        if not any(received):
            raise
        return b""


def _devices_header(sock, path):
    """The answer's first line, as JSON (``rest``: what came after it in the read)."""
    data = b""
    while b"\n" not in data and len(data) < 65536:
        chunk = _receive(sock, [data])
        if not chunk:
            break
        data += chunk
    line, _, rest = data.partition(b"\n")
    if not data:
        raise AmproxyError("the server on %s sent no answer (its log may say why)" % path)
    try:
        header = json.loads(line)
    except ValueError:
        header = None
    if isinstance(header, dict) and header.get("error"):
        raise AmproxyError("the server on %s says: %s" % (path, header["error"]))
    if not isinstance(header, dict) or not isinstance(header.get("devices"), int):
        raise AmproxyError("the server on %s answered without a list of devices: it is an "
                           "amproxy from before 'amproxy devices' (upgrade and restart it)"
                           % path)
    header["rest"] = rest
    return header


def cmd_route(argv):
    parser = config_parser("amproxy route", "Print the Carbon destinations of each metric, "
                           "in the order carbon's router yields them, as the server with "
                           "the same options sends it.", ROUTE_OPTIONS, argv)
    parser.add_argument("metrics", nargs="*", metavar="METRIC",
                        help="metric names (default: one per line from standard input)")
    args = parser.parse_args(argv)
    placement = Placement.from_options(args)
    for warning in placement.warnings():
        print("amproxy route: warning: %s" % warning, file=sys.stderr)
    metrics = args.metrics or (line.strip() for line in sys.stdin if line.strip())
    for metric in metrics:
        destinations = placement.route(metric.encode("utf-8", "surrogateescape"))
        print(" ".join([metric] + [str(d) for d in destinations]))
    return 0


def _client_tls(args):
    """The TLS arguments of Client from the command's options; files are checked here."""
    if not args.tls:
        return {}
    try:
        client_context(args.ca_file or None, args.client_cert or None, args.client_key or None)
    except (OSError, ssl.SSLError) as e:
        raise AmproxyError("cannot use the TLS files (--ca-file %s, --client-cert %s): %s" % (
            args.ca_file or "none", args.client_cert or "none",
            getattr(e, "strerror", None) or e)) from None
    return {"tls": True, "ca_file": args.ca_file or None,
            "cert_file": args.client_cert or None, "key_file": args.client_key or None}


def cmd_client_send(argv):
    parser = build_parser("amproxy client send", "Send one signed data point.",
                          [KEY_PUBLIC, KEY_PRIVATE, SERVER_ADDR] + CLIENT_TLS_OPTIONS)
    parser.add_argument("metric", help="the metric name")
    parser.add_argument("value", type=float, help="the value, a number")
    parser.add_argument("timestamp", nargs="?", type=int, help="Unix seconds (default: now)")
    args = parser.parse_args(argv)
    if not args.key_public or not args.key_private:
        raise AmproxyError("pass --key-public and --key-private (or KEY_PUBLIC and "
                           "KEY_PRIVATE)")
    value = int(args.value) if args.value.is_integer() else args.value
    client = Client(args.server_addr, args.key_public, args.key_private, **_client_tls(args))
    client.send(args.metric, value, args.timestamp)
    # No later flush will come, so a point kept for later would be lost.
    try:
        client.flush(raise_errors=True)
    except ssl.SSLCertVerificationError as e:
        raise AmproxyError("the certificate of amproxy at %s was not accepted: %s (see "
                           "--ca-file); the point was not sent" % (
                               format_address(client.address), e.verify_message)) from None
    except OSError as e:
        raise AmproxyError("cannot reach amproxy at %s: %s; the point was not sent" % (
            format_address(client.address), e.strerror or e)) from None
    client.close()
    return 0


COMMANDS = {
    ("server",): cmd_server,
    ("client", "signature"): cmd_client_signature,
    ("client", "test-client"): cmd_client_test_client,
    ("client", "send"): cmd_client_send,
    ("keys", "new"): cmd_keys_new,
    ("keys", "list"): cmd_keys_list,
    ("keys", "revoke"): cmd_keys_revoke,
    ("keys", "rotate"): cmd_keys_rotate,
    ("auth-file", "check"): cmd_auth_file_check,
    ("stats",): cmd_stats,
    ("devices",): cmd_devices,
    ("route",): cmd_route,
}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["--version"], ["version"]):
        print("amproxy", __version__)
        return 0
    for words, command in COMMANDS.items():
        if tuple(argv[:len(words)]) == words:
            try:
                return command(argv[len(words):])
            except AmproxyError as e:
                print("amproxy: error: %s" % e, file=sys.stderr)
                return 1
            except KeyboardInterrupt:
                return 130
            except BrokenPipeError:  # `amproxy keys list | head`: the reader had enough
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                return 141
    return _usage(argv)


def _usage(argv):
    """Help for ``amproxy``, or for a group of commands (``amproxy keys --help``)."""
    asked = any(arg in ("-h", "--help") for arg in argv[:2])
    words = [arg for arg in argv[:2] if not arg.startswith("-")]
    groups = {command[0] for command in COMMANDS}
    if words and words[0] in groups:
        usage = "usage: amproxy %s COMMAND [options]\n\ncommands:\n" % words[0] + "".join(
            line + "\n" for line in _command_lines(words[0]))
        if not asked and len(words) > 1:
            print("amproxy: unknown command '%s %s'; see 'amproxy %s --help'" % (
                words[0], words[1], words[0]), file=sys.stderr)
            return 2
    elif words and not asked:
        print("amproxy: unknown command '%s'; see 'amproxy --help'" % words[0],
              file=sys.stderr)
        return 2
    else:
        usage = USAGE
    print(usage, file=sys.stdout if asked else sys.stderr, end="")
    return 0 if asked else 2


def _command_lines(group):
    """The lines of USAGE about one group's commands (with their continuation lines)."""
    lines, taking = [], False
    for line in USAGE.splitlines():
        if line.startswith("  ") and not line.startswith("   "):
            taking = line.split()[0] == group
        if taking:
            lines.append(line)
    return lines


if __name__ == "__main__":
    sys.exit(main())
