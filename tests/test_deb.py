"""The Debian package, built by `make deb`, installed with dpkg on the real /.

One package's life on a sysvinit host, as an admin lives it: install (with the
admin's own config kept), a key added, a signed line reaching a real
carbon-cache, a reinstall and an upgrade that change nothing of the admin's,
remove (stopped, config kept) and purge (nothing left).  Runs only as root, with
Debian's build tools and lintian, on a host with no amproxy and no amproxy user
(it skips otherwise; under AMPROXY_CI=1, as .ci/run sets, it fails instead).
tests/debpkg.py builds, installs and cleans up; other tests reuse it.
"""
import grp
import hashlib
import os
import pwd
import re
import socket
import stat
import time

import pytest

from conftest import ROOT, free_port, line_for, pid_alive, port_open, wait_points
from debpkg import (AUTH_FILE, CONFFILES, CONFIG_FILE, admin, amproxy_user, build_deb,
                    build_seconds, installed_package, leftovers, lintian, package_status,
                    require_host, setup_cfg_version)
from devcarbon import wait_for

# The message a fresh install logs (one line), before any key exists.
NO_KEYS = re.compile(r"^.*auth file /etc/amproxy/auth_file\.yaml has no keys.*"
                     r"amproxy keys new.*$", re.MULTILINE)


@pytest.fixture(scope="module")
def debs():
    """The package, built once (revision 1), and a newer build of it (revision 2)."""
    require_host()
    return {1: build_deb(1), 2: build_deb(2)}


def test_make_deb_builds_a_package_lintian_passes(debs):
    result = lintian(debs[1])
    assert result.returncode == 0, result.stdout + result.stderr
    assert build_seconds(1) < 120
    fields = admin("dpkg-deb", "--field", debs[1], "Package", "Version", "Architecture",
                   "Depends", check=True).stdout
    assert "Package: amproxy\n" in fields
    assert "Version: %s-1\n" % setup_cfg_version() in fields
    assert "Architecture: all\n" in fields
    depends = {d.strip() for d in fields.split("Depends:")[1].split("\n")[0].split(",")}
    debian = {"python3", "python3-yaml", "python3-configargparse", "python3-pythonjsonlogger",
              "adduser"}
    assert debian <= depends <= debian | {"python3:any"}  # Debian's only, nothing from PyPI
    # Revision 2 is what dpkg calls newer.
    assert admin("dpkg", "--compare-versions", "%s-2" % setup_cfg_version(), "gt",
                 "%s-1" % setup_cfg_version()).returncode == 0
    contents = admin("dpkg-deb", "--contents", debs[1], check=True).stdout
    # The auth file is not shipped in /etc (not a conffile), only its template.
    assert "./etc/amproxy/auth_file.yaml" not in contents
    assert "./usr/share/amproxy/auth_file.yaml" in contents
    assert "./usr/share/man/man1/amproxy.1.gz" in contents
    assert "./run/" not in contents


def _mode(path):
    """(owner, group, mode) of a path."""
    st = os.stat(path)
    return (pwd.getpwuid(st.st_uid).pw_name, grp.getgrgid(st.st_gid).gr_name,
            stat.S_IMODE(st.st_mode))


def _state():
    """What an install or upgrade must leave alone: the user, directories, auth file."""
    user = amproxy_user()
    with open(AUTH_FILE, "rb") as f:
        auth = hashlib.sha256(f.read()).hexdigest()
    with open(CONFIG_FILE) as f:
        conf = f.read()
    return {"user": (user.pw_uid, user.pw_gid, user.pw_dir, user.pw_shell),
            "dirs": {d: _mode(d) for d in ("/var/lib/amproxy", "/var/lib/amproxy/spool",
                                           "/var/log/amproxy")},
            "auth": (auth, _mode(AUTH_FILE), os.stat(AUTH_FILE).st_ino), "conf": conf}


def _send_and_find(carbon, port, secret, metric):
    """One signed line to the installed server; wait until whisper holds it."""
    keys = {"dev1": (secret, [])}
    timestamp = int(time.time()) - 30
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(line_for(keys, "dev1", metric, 42, timestamp))
    wait_points(carbon, metric, {timestamp: 42.0}, timestamp, timeout=20)


def _check_running(package, port):
    status = admin("/etc/init.d/amproxy", "status")
    assert status.returncode == 0, status.stdout + status.stderr
    package.wait_running()
    wait_for(lambda: port_open(port), 15, what="amproxy to listen on %d" % port)


def test_install_key_reinstall_upgrade_remove_purge(debs, carbon):
    port = free_port()
    conf = ("# tests/test_deb.py: this host's ports only\n"
            "addr = 127.0.0.1:%d\ncarbon-addr = %s\nauth-file = %s\n"
            "spool-dir = /var/lib/amproxy/spool\n"
            "stats-socket = /run/amproxy/amproxy.stats.sock\nworkers = 2\n"
            % (port, carbon.address, AUTH_FILE))
    version = setup_cfg_version()
    late = []  # checks reported at the end, so that the rest of the life still runs
    with installed_package(debs[1], conf) as package:
        # The user, its directories and the auth file.
        user = amproxy_user()
        assert user is not None and user.pw_uid < 1000 and user.pw_dir == "/var/lib/amproxy"
        assert grp.getgrgid(user.pw_gid).gr_name == "amproxy"
        assert _mode("/var/lib/amproxy") == ("amproxy", "amproxy", 0o750)
        assert _mode("/var/lib/amproxy/spool") == ("amproxy", "amproxy", 0o750)
        assert _mode("/var/log/amproxy") == ("amproxy", "adm", 0o750)
        assert _mode(AUTH_FILE) == ("root", "amproxy", 0o640)
        with open(CONFIG_FILE) as f:
            assert f.read() == conf  # --force-confold: the admin's file stays
        listed = admin("dpkg-query", "--showformat=${Conffiles}", "-W", "amproxy",
                       check=True).stdout
        assert {line.split()[0] for line in listed.splitlines() if line.strip()} == CONFFILES
        # The command, its man page and their version: setup.cfg's.
        assert admin("amproxy", "--version", check=True).stdout == "amproxy %s\n" % version
        manual = admin("man", "--warnings", "-l", "/usr/share/man/man1/amproxy.1.gz",
                       check=True)
        assert manual.stderr == "" and "amproxy %s" % version in manual.stdout
        assert "--carbon-addr" in manual.stdout.replace("\u2010", "-")

        # Running, listening on the test's port only, and saying it takes nothing yet.
        _check_running(package, port)
        package.wait_log(lambda log: "workers ready" in log, what="workers ready")
        if not NO_KEYS.search(package.log()):
            late.append("the first start did not log, in one line, that %s has no keys and "
                        "that 'amproxy keys new' adds one; the log:\n%s" % (
                            AUTH_FILE, package.log()))

        # A key, a reload, and a signed line that reaches carbon-cache.
        added = admin("amproxy", "keys", "new", "dev1", "--metric", "test.dev1.*", check=True)
        secret = added.stdout.strip()
        assert secret and _mode(AUTH_FILE) == ("root", "amproxy", 0o640)
        assert admin("/etc/init.d/amproxy", "reload").returncode == 0
        package.wait_log(lambda log: re.search(r'auth file reloaded.* keys=1\b', log),
                         what="the auth file reloaded with one key")
        _send_and_find(carbon, port, secret, "test.dev1.install%d" % port)

        # A reinstall, then an upgrade: nothing of the admin's changes, and the
        # service runs again afterwards with the same key.
        before = _state()
        for deb, step in ((debs[1], "reinstall"), (debs[2], "upgrade")):
            package.dpkg("-i", deb)
            assert _state() == before, step
            assert package_status().startswith("ii"), step
            _check_running(package, port)
            assert "dev1" in admin("amproxy", "keys", "list", check=True).stdout
            _send_and_find(carbon, port, secret, "test.dev1.%s%d" % (step, port))
        assert admin("dpkg-query", "-W", "--showformat=${Version}", "amproxy",
                     check=True).stdout == "%s-2" % version

        # remove: stopped, the config and the keys kept.
        pid = package.master_pid()
        package.dpkg("-r", "amproxy")
        wait_for(lambda: not port_open(port), 30, what="the port to close")
        wait_for(lambda: not pid_alive(pid), 30, what="the master to exit")
        assert package_status().startswith("rc")
        assert not os.path.exists("/usr/bin/amproxy")
        assert not os.path.exists("/usr/lib/amproxy")  # byte-code too (py3clean)
        with open(CONFIG_FILE) as f:
            assert f.read() == conf
        with open(AUTH_FILE) as f:
            assert "dev1:" in f.read()
        assert os.path.isdir("/var/lib/amproxy/spool")

        # purge: nothing left, but the user (Debian's practice: its uid is not reused).
        package.dpkg("-P", "amproxy")
        assert package_status() in (None, "un ", "pn ")
        assert leftovers() == []
        assert amproxy_user() is not None
    # Whatever happened, nothing is left, the user included.
    assert leftovers() == [] and amproxy_user() is None and package_status() in (
        None, "un ", "pn ")
    assert not late, "\n".join(late)


def test_the_changelog_is_generated_from_setup_cfg(debs):
    """The only version literal in the tree is setup.cfg's: the package's changelog
    is written at build time."""
    assert not os.path.exists(os.path.join(ROOT, "debian", "changelog"))
    result = admin("sh", "-c", "dpkg-deb --fsys-tarfile '%s' | tar -xOf - "
                   "./usr/share/doc/amproxy/changelog.Debian.gz | gzip -d" % debs[2])
    assert result.stdout.startswith("amproxy (%s-2) " % setup_cfg_version()), result.stdout
