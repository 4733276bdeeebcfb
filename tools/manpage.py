#!/usr/bin/env python3
"""Write amproxy(1), the man page, to standard output.

Everything in it that can change comes from where ``--help`` comes from: the
options from their declarations in amproxy/config.py (flag, environment
variable, default, help, and whether SIGHUP applies a change), the commands
from cli.COMMANDS and the summary lines of cli.USAGE, and each command's own
arguments from the parser the command builds.  The page is built from the
tree it sits in: ``python3 tools/manpage.py > amproxy.1`` (``make install``
does this).  Its date is SOURCE_DATE_EPOCH's when set (a package build), so
the same tree gives the same page.
"""

import argparse
import datetime
import os
import re
import sys
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import configargparse  # noqa: E402

from amproxy import __version__, cli, config  # noqa: E402
from amproxy.worker import WORKER_BOOT_ERROR  # noqa: E402

# What an option's value looks like, by the name of its type function.
METAVARS = {"address": "HOST:PORT", "duration": "DURATION", "size": "SIZE",
            "boolean": "true|false", "networks": "NETWORKS", "prefix length": "BITS",
            "destinations": "HOST:PORT,...", "positive_int": "N", "non_negative_int": "N",
            "non_negative_number": "N", "str": "VALUE"}
# A string option's value, by the end of its flag.
STRING_METAVARS = [("-dir", "DIR"), ("file", "FILE"), ("-cert", "FILE"), ("-key", "FILE"),
                   ("-ca", "FILE"), ("-socket", "FILE"), ("user", "USER"), ("group", "GROUP"),
                   ("-prefix", "PREFIX"), ("-metric", "METRIC")]
# A default that depends on the machine the page is built on.
MACHINE_DEFAULTS = {"--workers": "the number of CPUs"}

FILES = [
    ("/etc/amproxy/amproxy.conf", "the config file, read by every command when it exists"),
    ("/etc/amproxy/auth_file.yaml", "the keys (root:amproxy, 0640): each public key's secret "
     "and the metrics it may write; edited by amproxy keys"),
    ("/etc/default/amproxy", "the init script's settings (user, pidfile, log file, "
     "extra options)"),
    ("/run/amproxy/amproxy.pid", "the master's pid, under the init script"),
    ("/run/amproxy/amproxy.stats.sock", "where amproxy stats reads the running totals, "
     "and amproxy devices the devices"),
    ("/var/lib/amproxy/spool", "lines waiting for Carbon, when memory is full"),
    ("/var/log/amproxy/amproxy.log", "the log, under the init script (systemd: the journal)"),
]


def roff(text):
    """Plain text as roff: escapes, real minus signs in flags, no control lines."""
    text = text.replace("\\", "\\e")
    text = re.sub(r"(?<![\w-])(--?)(?=[A-Za-z0-9])",
                  lambda m: "\\-" * len(m.group(1)), text)
    text = "".join(c if ord(c) < 128 else "\\[u%04X]" % ord(c) for c in text)
    return "\n".join("\\&" + line if line[:1] in (".", "'") else line
                     for line in text.split("\n"))


def sentence(text):
    text = text.strip()
    return text if not text or text.endswith(".") else text + "."


def expand(help_text, default):
    """A help string as argparse shows it (``%(default)s``, ``%%``)."""
    return help_text % {"default": default, "prog": "amproxy"} if "%" in help_text \
        else help_text


def declared_options():
    """Every Option that amproxy/config.py declares, once each, in declaration order."""
    found = []
    for value in vars(config).values():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, config.Option) and all(item is not o for o in found):
                found.append(item)
    return found


def metavar(option):
    if option.type is bool:
        return None
    if option.choices:
        return "|".join(option.choices)
    name = getattr(option.type, "__name__", "")
    if name == "str":
        return next((word for ending, word in STRING_METAVARS
                     if option.flag.endswith(ending)), "VALUE")
    return METAVARS.get(name, "VALUE")


def default_text(option):
    if option.flag in MACHINE_DEFAULTS:
        return MACHINE_DEFAULTS[option.flag]
    if "default:" in option.help:  # the help says it in words
        return None
    if option.type is bool:
        return "off"
    if option.default in (None, ""):
        return "none"
    if option.default is True:
        return "true"
    return str(option.default)


def option_item(option, server):
    """One option as a tagged paragraph: its help, default, variable, config key, SIGHUP."""
    arg = metavar(option)
    lines = [".TP", "\\fB%s\\fR%s" % (roff(option.flag), " \\fI%s\\fR" % roff(arg) if arg else ""),
             roff(sentence(expand(option.help, option.default)))]
    facts = []
    default = default_text(option)
    if default is not None:
        facts.append("Default: \\fB%s\\fR." % roff(default))
    if option.env:
        facts.append("Environment: \\fB%s\\fR." % roff(option.env))
    if server:
        facts.append("Config file: \\fB%s\\fR." % roff(option.flag[2:]))
        facts.append("SIGHUP applies a change." if option.live else
                     "A change takes effect at the next start.")
    return lines + facts


def usage_entries():
    """cli.USAGE's commands: [(synopsis, description)], as 'amproxy --help' shows them."""
    entries = []
    for line in cli.USAGE.split("commands:", 1)[1].splitlines():
        if line.startswith("  ") and not line.startswith("   "):
            synopsis, _, description = line.strip().partition("  ")
            entries.append([synopsis.strip(), description.strip()])
        elif line.startswith("   ") and entries:
            entries[-1][1] = (entries[-1][1] + " " + line.strip()).strip()
    return entries


class _Parsed(Exception):
    def __init__(self, parser):
        super().__init__()
        self.parser = parser


def command_parser(function):
    """The parser a command builds: every command parses its arguments first."""
    def capture(parser, *args, **kwargs):
        raise _Parsed(parser)
    with mock.patch.object(configargparse.ArgumentParser, "parse_args", capture), \
            mock.patch.object(argparse.ArgumentParser, "parse_args", capture):
        try:
            function([])
        except _Parsed as parsed:
            return parsed.parser
    raise RuntimeError("%s did not build a parser" % function.__name__)


def command_section(words, function, entries, declared):
    name = " ".join(words)
    synopsis, summary = next(((s, d) for s, d in entries
                              if s == name or s.startswith(name + " ")), (name, ""))
    parser = command_parser(function)
    lines = [".SS \"amproxy %s\"" % roff(synopsis)]
    text = parser.description or summary
    if text:
        lines.append(roff(sentence(text[:1].upper() + text[1:])))
    shared, own = [], []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        flag = action.option_strings[-1] if action.option_strings else None
        # An option made from a declaration (the same flag and variable), not a
        # command's own argument of the same name (keys new --metric).
        if flag in declared and getattr(action, "env_var", None) == declared[flag].env:
            shared.append(flag)
        else:
            own.append(action)
    if words == ("server",):
        lines.append("Its options are under \\fBSERVER OPTIONS\\fR.")
    elif shared:
        lines.append("Also takes %s (see \\fBOPTIONS\\fR)." % ", ".join(
            "\\fB%s\\fR" % roff(flag) for flag in shared))
    if own:
        lines.append(".RS")
        for action in own:
            value = action.metavar or METAVARS.get(getattr(action.type, "__name__", ""),
                                                   action.dest.upper())
            if action.option_strings:
                head = "\\fB%s\\fR" % roff(", ".join(action.option_strings))
                if action.nargs != 0:
                    head += " \\fI%s\\fR" % roff(value)
            else:
                head = "\\fI%s\\fR" % roff(action.metavar or action.dest.upper())
            text = roff(sentence(expand(action.help, action.default) if action.help
                                 else action.dest.replace("_", " ")))
            if action.option_strings and action.required:
                text += " Required."
            if action.option_strings and action.nargs != 0 and action.default is not None \
                    and "default:" not in (action.help or ""):
                text += " Default: \\fB%s\\fR." % roff(str(action.default))
            if action.nargs in ("*", "?") and not action.option_strings:
                text += " Optional."
            lines += [".TP", head, text]
        lines.append(".RE")
    return lines


def page():
    date = datetime.datetime.fromtimestamp(
        int(os.environ.get("SOURCE_DATE_EPOCH") or datetime.datetime.now().timestamp()),
        datetime.timezone.utc).strftime("%Y-%m-%d")
    options = declared_options()
    declared = {option.flag: option for option in options}
    server = config.SERVER_OPTIONS + [config.CONFIG_OPTION]
    others = [option for option in options if all(option is not o for o in server)]
    entries = usage_entries()
    out = [
        ".\\\" Generated by tools/manpage.py from amproxy's option declarations; do not edit.",
        ".TH AMPROXY 1 \"%s\" \"amproxy %s\" \"User Commands\"" % (date, roff(__version__)),
        ".nh",
        ".ad l",
        ".SH NAME",
        "amproxy \\- authenticating proxy for Graphite's Carbon",
        ".SH SYNOPSIS",
        ".B amproxy",
        ".I COMMAND",
        "[\\fIoptions\\fR]",
        ".br",
        ".B amproxy",
        "\\fB\\-\\-version\\fR | \\fB\\-\\-help\\fR",
        ".SH DESCRIPTION",
        "Devices sign every line with HMAC\\-SHA256:",
        ".IP",
        "\\fImetric value timestamp public_key signature\\fR",
        ".PP",
        "\\fBamproxy server\\fR checks the key, the signature, the clock skew and that the "
        "key may write the metric, and forwards the good lines to Carbon's plaintext port.",
        "Rejected lines are counted and logged; amproxy never answers a device.",
        "The other commands manage the keys, check the auth file, sign and send lines, "
        "show where metrics go, and read a running server's totals and which of its "
        "devices are silent, and why.",
        ".SH COMMANDS",
    ]
    for words, function in cli.COMMANDS.items():
        out += command_section(words, function, entries, declared)
    out += [
        ".SH OPTIONS",
        "Every option is a flag, an environment variable, or a line "
        "\\fIoption\\fR = \\fIvalue\\fR in the config file, named as the flag without its "
        "dashes.",
        "A flag beats the environment, which beats the config file, which beats the "
        "default.",
        "Durations are Go's (90s, 5m0s, 1h30m, 250ms), plain seconds, or days (7d); "
        "sizes take K, M or G.",
        ".SS \"SERVER OPTIONS\"",
        "\\fBamproxy server\\fR takes all of these; \\fBamproxy route\\fR those about Carbon's "
        "destinations.",
    ]
    for option in server:
        out += option_item(option, server=True)
    out += [".SS \"CLIENT OPTIONS\"",
            "\\fBamproxy client\\fR's commands take these (each command lists its own above)."]
    for option in others:
        out += option_item(option, server=False)
    out += [
        ".SH SIGNALS",
        "Sent to the master (its pid is in \\fB\\-\\-pidfile\\fR):",
        ".TP", ".B HUP",
        "Read the auth file, the TLS files and the config file again.",
        "These options take a new value: %s;" % ", ".join(
            "\\fB%s\\fR" % roff(name.replace("_", "-")) for name in config.LIVE_OPTIONS),
        "a change to any other one waits for a restart.",
        ".TP", ".B USR1", "Reopen the log file (logrotate sends it).",
        ".TP", ".BR TERM \", \" INT",
        "Graceful stop: read what clients sent, deliver it to Carbon or spool it, exit.",
        ".TP", ".B QUIT", "Fast stop: spool what is held and exit.",
        ".TP", ".BR TTIN \", \" TTOU", "One worker more, or one fewer.",
        ".SH FILES",
    ]
    for path, text in FILES:
        out += [".TP", ".I %s" % roff(path), roff(sentence(text))]
    out += [
        ".SH EXIT STATUS",
        "0 on success, 1 on an error (one line on standard error says what), "
        "2 for a bad command or option;",
        "\\fBamproxy server\\fR exits %d when a worker cannot start." % WORKER_BOOT_ERROR,
        ".SH EXAMPLES",
        "Add a device's key (its secret is printed once) and check the file:",
        ".PP", ".nf", ".RS",
        roff("amproxy keys new sensor1 --metric 'home.sensor1.**'"),
        roff("amproxy auth-file check"),
        ".RE", ".fi", ".PP",
        "Send one signed point, as a device would:",
        ".PP", ".nf", ".RS",
        roff("amproxy client send --key-public sensor1 --key-private SECRET \\"),
        roff("    home.sensor1.temp 21.5"),
        ".RE", ".fi",
        ".SH SEE ALSO",
        ".BR carbon-cache (1),",
        "the README (/usr/share/doc/amproxy/README.md.gz in the Debian package).",
    ]
    return "\n".join(out) + "\n"


def main():
    sys.stdout.write(page())
    return 0


if __name__ == "__main__":
    sys.exit(main())
