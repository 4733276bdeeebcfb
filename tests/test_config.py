import pytest

from amproxy.config import (parse_address, parse_duration, parse_server_args, parse_size)


@pytest.mark.parametrize("text, seconds", [
    ("5m0s", 300), ("300s", 300), ("5m", 300), ("1h30m", 5400), ("90s", 90),
    ("1.5s", 1.5), ("250ms", 0.25), ("0", 0), ("0s", 0), ("2h", 7200), ("45", 45),
    ("1m30.5s", 90.5), ("100us", 0.0001), ("1h0m0s", 3600),
])
def test_go_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5x", "m", "1h 30m", "-5s", "5s5", "s5", "inf",
                                  "nan", "1.2.3s"])
def test_bad_durations(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def test_addresses_and_sizes():
    assert parse_address("127.0.0.1:2003") == ("127.0.0.1", 2003)
    assert parse_address(":2005") == ("", 2005)
    assert parse_address("[::1]:2005") == ("::1", 2005)
    for bad in ("localhost", "host:port", "h:99999"):
        with pytest.raises(ValueError):
            parse_address(bad)
    assert parse_size("512M") == 512 << 20
    assert parse_size("2G") == 2 << 30
    assert parse_size("1000") == 1000


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for name in ("ADDR", "AUTH_FILE", "CARBON_ADDR", "MAX_SKEW", "WORKERS",
                 "AMPROXY_CONFIG", "AMPROXY_LOG_LEVEL", "AMPROXY_LOG_FORMAT"):
        monkeypatch.delenv(name, raising=False)
    # Keep a real /etc/amproxy/amproxy.conf on the test machine out of the way.
    monkeypatch.setattr("amproxy.config.DEFAULT_CONFIG_FILE", str(tmp_path / "none.conf"))
    return monkeypatch


def test_defaults_match_the_original(clean_env):
    opts = parse_server_args([])
    assert opts.addr == ("127.0.0.1", 2005)
    assert opts.auth_file == "/etc/amproxy/auth_file.yaml"
    assert opts.carbon_addr == [("127.0.0.1", 2003, None)]
    assert opts.skew == 300
    assert opts.log_format == "logfmt"
    assert opts.log_level == "info"
    assert opts.workers >= 1
    assert opts.auth_reload_interval == 1


def test_original_environment_variables(clean_env):
    clean_env.setenv("ADDR", "0.0.0.0:2005")
    clean_env.setenv("AUTH_FILE", "/tmp/a.yaml")
    clean_env.setenv("CARBON_ADDR", "10.0.0.1:2003")
    clean_env.setenv("MAX_SKEW", "1h30m")
    clean_env.setenv("WORKERS", "3")
    opts = parse_server_args([])
    assert opts.addr == ("0.0.0.0", 2005)
    assert opts.auth_file == "/tmp/a.yaml"
    assert opts.carbon_addr == [("10.0.0.1", 2003, None)]
    assert opts.skew == 5400
    assert opts.workers == 3


def test_precedence_flag_env_file_default(clean_env, tmp_path):
    conf = tmp_path / "amproxy.conf"
    conf.write_text("# comment\nskew = 10s\nworkers = 4\nauth-file = /from/file\n"
                    "log-level = debug\n")
    clean_env.setenv("AMPROXY_CONFIG", str(conf))
    clean_env.setenv("MAX_SKEW", "20s")
    clean_env.setenv("WORKERS", "5")
    opts = parse_server_args(["--workers", "6"])
    assert opts.workers == 6               # flag beats env and file
    assert opts.skew == 20                 # env beats file
    assert opts.auth_file == "/from/file"  # file beats default
    assert opts.log_level == "debug"
    assert opts.carbon_addr == [("127.0.0.1", 2003, None)]  # default


def test_default_config_file_is_read_when_present(clean_env, tmp_path):
    conf = tmp_path / "amproxy.conf"
    conf.write_text("workers = 7\n")
    clean_env.setattr("amproxy.config.DEFAULT_CONFIG_FILE", str(conf))
    assert parse_server_args([]).workers == 7


def test_bad_values_exit_with_usage(clean_env, capsys):
    for argv in (["--skew", "5 minutes"], ["--workers", "0"], ["--carbon-addr", "nope"],
                 ["--log-level", "loud"]):
        with pytest.raises(SystemExit) as exc:
            parse_server_args(argv)
        assert exc.value.code == 2
    assert "--skew" in capsys.readouterr().err


def test_unknown_config_file_key_is_an_error(clean_env, tmp_path, capsys):
    conf = tmp_path / "amproxy.conf"
    conf.write_text("wrokers = 2\n")
    with pytest.raises(SystemExit):
        parse_server_args(["--config", str(conf)])
    assert "wrokers" in capsys.readouterr().err


def test_an_explicit_config_replaces_the_default_file(clean_env, monkeypatch, tmp_path):
    """--config or AMPROXY_CONFIG: the host's /etc/amproxy/amproxy.conf is not read at all."""
    hostile = tmp_path / "etc-amproxy.conf"
    hostile.write_text("addr = 0.0.0.0:1\nspool-dir = /var/lib/someone-else\n")
    monkeypatch.setattr("amproxy.config.DEFAULT_CONFIG_FILE", str(hostile))
    assert parse_server_args([]).spool_dir == "/var/lib/someone-else"  # the default file
    mine = tmp_path / "mine.conf"
    mine.write_text("workers = 3\n")
    for argv in (["--config", str(mine)], ["--config=%s" % mine], ["--config", "/dev/null"]):
        opts = parse_server_args(argv)
        assert opts.spool_dir == "" and opts.addr == ("127.0.0.1", 2005), argv
    monkeypatch.setenv("AMPROXY_CONFIG", str(mine))
    opts = parse_server_args([])
    assert opts.workers == 3 and opts.spool_dir == ""


def test_live_options_are_marked_where_they_are_declared():
    from amproxy.config import LIVE_OPTIONS, SERVER_OPTIONS
    assert "skew" in LIVE_OPTIONS and "addr" not in LIVE_OPTIONS
    assert set(LIVE_OPTIONS) <= {option.dest for option in SERVER_OPTIONS}


def test_an_abbreviated_config_flag_is_refused(clean_env, tmp_path):
    mine = tmp_path / "mine.conf"
    mine.write_text("workers = 3\n")
    with pytest.raises(SystemExit):
        parse_server_args(["--conf", str(mine)])  # argparse would take it for --config


def test_source_ipv6_prefix(clean_env, tmp_path, capsys):
    assert parse_server_args([]).source_ipv6_prefix == 64
    assert parse_server_args(["--source-ipv6-prefix", "128"]).source_ipv6_prefix == 128
    clean_env.setenv("AMPROXY_SOURCE_IPV6_PREFIX", "48")
    assert parse_server_args([]).source_ipv6_prefix == 48
    clean_env.delenv("AMPROXY_SOURCE_IPV6_PREFIX")
    conf = tmp_path / "prefix.conf"
    conf.write_text("source-ipv6-prefix = 56\n")
    assert parse_server_args(["--config", str(conf)]).source_ipv6_prefix == 56
    for bad in ("0", "129", "-64", "/64"):
        with pytest.raises(SystemExit):
            parse_server_args(["--source-ipv6-prefix", bad])
    assert "'/64' is not an IPv6 prefix length from 1 to 128" in capsys.readouterr().err
    from amproxy.config import LIVE_OPTIONS
    assert "source_ipv6_prefix" in LIVE_OPTIONS


def test_proxy_protocol_from_is_unset_by_default(clean_env):
    # Unset: the workers take headers from loopback only (tests/test_source_slots.py).
    assert parse_server_args([]).proxy_protocol_from == ()


def test_checks_across_options_live_in_one_place_and_refuse_what_cannot_run():
    from amproxy.config import check_options
    from amproxy.errors import ConfigError
    from amproxy.config import reread_server_args
    with pytest.raises(ConfigError, match="--tls-addr needs --tls-cert and --tls-key"):
        reread_server_args(["--tls-addr", "127.0.0.1:2443"])
    options = reread_server_args(["--carbon-addr", "127.0.0.1:2003:a,127.0.0.1:2004:b",
                                  "--daemon"])
    warnings = check_options(options)
    assert any("no --spool-dir" in w for w in warnings)
    assert any("without --log-file" in w for w in warnings)
    assert check_options(reread_server_args([])) == []
