"""The README's option table and signal table say what the declarations say."""
import os
import re

from amproxy.config import LIVE_OPTIONS, SERVER_OPTIONS

from conftest import ROOT


def readme():
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def option_rows():
    """{flag: (env var, default as written)} from the server options table."""
    rows = {}
    for line in readme().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 4 or not cells[0].startswith("`--"):
            continue
        flags = re.findall(r"`(--[\w-]+)`", cells[0])
        envs = re.findall(r"`(\w+)`", cells[1])
        for flag, env in zip(flags, envs if len(envs) == len(flags) else envs * len(flags)):
            rows.setdefault(flag, (env, cells[2]))
    return rows


def test_every_server_option_is_in_the_readme_table_with_its_variable_and_default():
    rows = option_rows()
    for option in SERVER_OPTIONS:
        assert option.flag in rows, "%s is not in the README's option table" % option.flag
        env, default = rows[option.flag]
        assert env == option.env, (option.flag, env, option.env)
        if isinstance(option.default, (str, int, float)) and option.type is not bool and \
                option.default not in ("", 0, None) and option.flag != "--workers":
            written = str(option.default).lower() if option.default is True else option.default
            assert default.startswith("`%s`" % written), (option.flag, default)


def test_the_readme_lists_exactly_the_options_that_change_live():
    hup = next(line for line in readme().splitlines() if line.startswith("| `HUP` |"))
    listed = set(re.findall(r"`([a-z][\w-]+)`", hup.split("take effect:")[1].split("(")[0]))
    assert listed == {name.replace("_", "-") for name in LIVE_OPTIONS}
