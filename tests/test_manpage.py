"""amproxy(1) says what the declarations say: every option, every command, every
argument of a command, found here independently of tools/manpage.py."""
import ast
import os
import re
import shutil
import subprocess

import pytest

import manpage
from amproxy import cli, config

from conftest import ROOT


def plain(roff):
    """The page's text without fonts and escapes, for searching."""
    text = re.sub(r"\\f[BIRP]", "", roff)
    return text.replace("\\-", "-").replace("\\&", "").replace("\\e", "\\")


def items(roff):
    """[(first line of a tagged paragraph, its text)]: one per option or argument."""
    found = []
    for block in roff.split("\n.TP\n")[1:]:
        head, _, body = block.partition("\n")
        found.append((plain(head), plain(body.split("\n.")[0])))
    return found


def declared_options():
    """Every Option object reachable from amproxy.config's names, and the number of
    Option(...) calls in its source: an Option made elsewhere would differ."""
    found = []
    for value in vars(config).values():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, config.Option) and all(item is not o for o in found):
                found.append(item)
    with open(config.__file__) as f:
        calls = sum(1 for node in ast.walk(ast.parse(f.read()))
                    if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "Option")
    return found, calls


def cli_arguments():
    """The arguments cli.py adds itself: flags, and positionals as the page names them."""
    with open(cli.__file__) as f:
        tree = ast.parse(f.read())
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            first = node.args[0].value
            metavar = next((k.value.value for k in node.keywords if k.arg == "metavar"), None)
            names.append(first if first.startswith("-") else (metavar or first.upper()))
    return names


def missing_from(roff):
    """What the page lacks, as sentences (nothing: it is complete)."""
    missing = []
    tagged = items(roff)
    text = plain(roff)
    options, calls = declared_options()
    if len(options) != calls:
        missing.append("config.py makes %d Options but only %d are reachable from its "
                       "names" % (calls, len(options)))
    for option in options:
        # A command's own argument may share the flag (keys new --metric): the
        # option's paragraph is the one with its variable.
        candidates = [body for head, body in tagged if head.split()[0] == option.flag]
        entry = next((body for body in candidates
                      if not option.env or "Environment: %s." % option.env in body),
                     candidates[0] if candidates else None)
        if entry is None:
            missing.append("option %s" % option.flag)
            continue
        if option.env and "Environment: %s." % option.env not in entry:
            missing.append("the variable of %s (%s)" % (option.flag, option.env))
        if option in config.SERVER_OPTIONS:
            live = "SIGHUP applies a change." in entry
            if live != option.live:
                missing.append("whether SIGHUP changes %s" % option.flag)
            if "Config file: %s." % option.flag[2:] not in entry:
                missing.append("the config key of %s" % option.flag)
        default = manpage.MACHINE_DEFAULTS.get(option.flag, option.default)
        if default not in (None, "", False, True) and "default:" not in option.help and \
                "Default: %s." % default not in entry:
            missing.append("the default of %s (%s)" % (option.flag, default))
    for words in cli.COMMANDS:
        if not re.search(r'^\.SS "amproxy %s( |")' % re.escape(" ".join(words)), roff,
                         re.MULTILINE):
            missing.append("command %s" % " ".join(words))
    for name in cli_arguments():
        if name not in text:
            missing.append("argument %s" % name)
    for name in config.LIVE_OPTIONS:
        if name.replace("_", "-") not in text.split("SIGNALS", 1)[-1].split("FILES")[0]:
            missing.append("%s in SIGHUP's list" % name)
    return missing


def test_every_option_command_and_argument_is_in_the_man_page():
    assert missing_from(manpage.page()) == []


def test_a_new_declaration_missing_from_the_page_is_found(monkeypatch):
    """The check above fails for an option declared but not on the page."""
    page = manpage.page()
    extra = config.Option("--frobnicate", "5s", "frobnicate", env="AMPROXY_FROBNICATE",
                          type=config.duration, live=True)
    monkeypatch.setattr(config, "SERVER_OPTIONS", config.SERVER_OPTIONS + [extra])
    assert "option --frobnicate" in missing_from(page)
    assert "option --frobnicate" not in missing_from(manpage.page())  # the generator has it
    monkeypatch.setattr(cli, "COMMANDS", {**cli.COMMANDS, ("keys", "frob"): None})
    assert "command keys frob" in missing_from(page)


def test_the_page_has_setup_cfgs_version_and_no_machine_defaults(monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    page = manpage.page()
    with open(os.path.join(ROOT, "setup.cfg")) as f:
        version = re.search(r"^version = (\S+)$", f.read(), re.MULTILINE).group(1)
    assert '.TH AMPROXY 1 "2023-11-14" "amproxy %s"' % version in page
    assert page == manpage.page()  # the same tree, the same page
    workers = dict(items(page))["--workers N"]
    assert "Default: the number of CPUs." in workers


@pytest.mark.skipif(not shutil.which("man"), reason="needs man (man-db)")
def test_the_page_is_valid_groff(tmp_path):
    path = tmp_path / "amproxy.1"
    path.write_text(manpage.page())
    result = subprocess.run(["man", "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z",
                             str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    shown = subprocess.run(["man", "-l", str(path)], capture_output=True, text=True,
                           timeout=60, env=dict(os.environ, MANWIDTH="80"))
    assert "amproxy keys new" in shown.stdout and shown.stderr == ""
