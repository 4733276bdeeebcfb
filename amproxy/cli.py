"""The ``amproxy`` command."""

import logging
import sys

from . import __version__
from .client import run_test_client
from .config import (KEY_PRIVATE, TEST_CLIENT_OPTIONS, build_parser, parse_server_args)
from .errors import AmproxyError
from .logs import setup_logging
from .master import Master
from .protocol import sign

log = logging.getLogger("amproxy")

USAGE = """usage: amproxy COMMAND [options]

commands:
  server                      run the proxy
  client signature TEXT       print the signature of TEXT (secret from --key-private
                              or KEY_PRIVATE)
  client test-client          send a random data point every --interval

Run 'amproxy COMMAND --help' for a command's options.
"""


def cmd_server(argv):
    options = parse_server_args(argv)
    try:
        setup_logging(options.log_format, options.log_level, options.log_file)
    except OSError as e:
        raise AmproxyError("cannot open log file %s: %s" % (options.log_file, e.strerror))
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
    print(sign(args.key_private, args.text))
    return 0


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
                    args.interval, args.count)
    return 0


COMMANDS = {
    ("server",): cmd_server,
    ("client", "signature"): cmd_client_signature,
    ("client", "test-client"): cmd_client_test_client,
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
    print(USAGE, file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout,
          end="")
    return 0 if argv[:1] in (["-h"], ["--help"]) else 2


if __name__ == "__main__":
    sys.exit(main())
