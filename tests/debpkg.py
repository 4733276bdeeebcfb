"""The Debian package for tests: build it (once per revision and session), check
the host can take it, install it as an admin would, and remove every trace.

    from debpkg import build_deb, require_host, installed_package

    require_host()                        # skip (fail under AMPROXY_CI=1) if not
    deb = build_deb(1)                    # make deb DEB_REVISION=1, into a temp dir
    with installed_package(deb, conf_text) as package:
        package.admin("amproxy", "keys", "new", ...)
        package.dpkg("-i", build_deb(2))  # an upgrade
    # purged, its processes stopped, the amproxy user and group deleted

Everything runs with an admin's environment (no virtualenv, no PYTHONPATH, no
AMPROXY_CONFIG), as root, on the real /; a host with any part of amproxy
installed, or a user named amproxy, is never touched.
"""
import atexit
import configparser
import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time

import pytest

from conftest import ROOT, children_of, pid_alive
from devcarbon import wait_for

# Under CI (.ci/run sets it) a host that cannot run the package tests fails them.
CI = os.environ.get("AMPROXY_CI") == "1"
ADMIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
TOOLS = ["dpkg", "dpkg-buildpackage", "dh", "dh_python3", "lintian", "man", "adduser",
         "deluser", "invoke-rc.d", "update-rc.d", "start-stop-daemon"]
PIDFILE = "/run/amproxy/amproxy.pid"
LOG_FILE = "/var/log/amproxy/amproxy.log"
CONFIG_FILE = "/etc/amproxy/amproxy.conf"
AUTH_FILE = "/etc/amproxy/auth_file.yaml"
CONFFILES = {CONFIG_FILE, "/etc/default/amproxy", "/etc/logrotate.d/amproxy",
             "/etc/init.d/amproxy"}
# Everything the package or its service may put down; none of it may remain
# after a purge, and a host with any of it is not a test host.
PATHS = ["/etc/amproxy", "/var/lib/amproxy", "/var/log/amproxy", "/run/amproxy",
         "/usr/lib/amproxy", "/usr/bin/amproxy", "/etc/init.d/amproxy", "/etc/default/amproxy",
         "/etc/logrotate.d/amproxy", "/lib/systemd/system/amproxy.service",
         "/lib/systemd/system/amproxy.socket", "/usr/share/amproxy",
         "/usr/share/man/man1/amproxy.1.gz", "/usr/share/doc/amproxy",
         "/usr/share/lintian/overrides/amproxy", "/usr/share/python3/runtime.d/amproxy.rtupdate"]
# What make install puts down elsewhere: a host with it is not a test host either.
MAKE_INSTALL_PATHS = ["/usr/local/bin/amproxy", "/usr/local/lib/amproxy",
                      "/usr/local/share/man/man1/amproxy.1"]
LEFTOVER_GLOBS = ["/etc/rc?.d/[SK][0-9][0-9]amproxy", "/etc/systemd/system/*/amproxy.*",
                  "/var/lib/systemd/deb-systemd-helper-enabled/*amproxy*",
                  "/var/lib/systemd/deb-systemd-helper-enabled/*/amproxy.*",
                  "/var/lib/systemd/deb-systemd-helper-masked/amproxy.*"]


def admin(*argv, timeout=300, check=False):
    """A command as a root shell runs it: nothing from this test's environment."""
    env = {"PATH": ADMIN_PATH, "LANG": "C.UTF-8", "HOME": "/root",
           "DEBIAN_FRONTEND": "noninteractive"}
    result = subprocess.run(list(argv), env=env, capture_output=True, text=True,
                            timeout=timeout, stdin=subprocess.DEVNULL)
    if check:
        assert result.returncode == 0, "%s: exit %d\n%s%s" % (
            " ".join(argv), result.returncode, result.stdout, result.stderr)
    return result


def setup_cfg_version():
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(os.path.join(ROOT, "setup.cfg"))
    return parser.get("metadata", "version")


def amproxy_user():
    try:
        return pwd.getpwnam("amproxy")
    except KeyError:
        return None


def package_status():
    """dpkg's status of amproxy ('ii ', 'rc ' ...), or None if dpkg does not know it."""
    result = admin("dpkg-query", "-W", "--showformat=${db:Status-Abbrev}", "amproxy")
    return result.stdout if result.returncode == 0 and result.stdout.strip() else None


def leftovers():
    """What of amproxy is on this host: paths, rc links, systemd state."""
    found = [path for path in PATHS if os.path.lexists(path)]
    for pattern in LEFTOVER_GLOBS:
        found += glob.glob(pattern)
    return found


def service_start_refusal():
    """Why invoke-rc.d would not start a service on this host, or None."""
    policy = "/usr/sbin/policy-rc.d"
    if os.access(policy, os.X_OK):
        answer = subprocess.run([policy, "amproxy", "start"], capture_output=True).returncode
        if answer != 0:
            return ("%s answers %d to 'amproxy start' (Docker's answers 101 to everything), "
                    "so the package's scripts cannot start amproxy; .ci/run shows how a "
                    "container allows it" % (policy, answer))
        return None
    if admin("runlevel").returncode != 0:
        return ("this host has no runlevel (a container without init) and no policy-rc.d "
                "allowing starts, so invoke-rc.d starts nothing; .ci/run shows how a "
                "container allows it")
    return None


def host_problems():
    """Why the package cannot be tested here, as sentences (none: it can)."""
    problems = []
    if os.geteuid() != 0:
        problems.append("installs a Debian package (needs root)")
    missing = [tool for tool in TOOLS if not shutil.which(tool, path=ADMIN_PATH)]
    if missing:
        problems.append("needs %s (apt-get install dpkg-dev debhelper dh-python lintian "
                        "man-db adduser)" % ", ".join(missing))
    if os.path.isdir("/run/systemd/system"):
        problems.append("this host runs systemd: the package would enable amproxy.socket, "
                        "which listens on 0.0.0.0:2005; the test drives the init script")
    present = leftovers() + [path for path in MAKE_INSTALL_PATHS if os.path.lexists(path)]
    if package_status():
        present.insert(0, "package %s" % package_status().strip())
    if amproxy_user():
        present.append("user amproxy")
    if present:
        problems.append("amproxy (the package, its files or its user) is on this host "
                        "already, and the test never touches it: %s" % ", ".join(present[:6]))
    if not problems:
        refusal = service_start_refusal()
        if refusal:
            problems.append(refusal)
    return problems


def require_host():
    """Skip the test where the package cannot be tested, or fail under AMPROXY_CI=1."""
    problems = host_problems()
    if problems:
        reason = "; ".join(problems)
        if CI:
            pytest.fail("AMPROXY_CI=1 and the package cannot be tested: " + reason,
                        pytrace=False)
        pytest.skip(reason)


_BUILT = {}
_BUILD_DIR = []


def build_deb(revision=1):
    """``make deb DEB_REVISION=revision`` into a temporary directory, once per session
    and revision; the .deb's path."""
    if revision not in _BUILT:
        if not _BUILD_DIR:
            _BUILD_DIR.append(tempfile.mkdtemp(prefix="amproxy-deb-"))
            atexit.register(shutil.rmtree, _BUILD_DIR[0], True)
        started = time.monotonic()
        result = subprocess.run(
            ["make", "-C", ROOT, "--no-print-directory", "deb", "DEB_REVISION=%s" % revision,
             "DEB_DIR=%s" % _BUILD_DIR[0], "DEB_LINTIAN=no"],
            env=dict(os.environ, LANG="C.UTF-8"), capture_output=True, text=True,
            timeout=600, stdin=subprocess.DEVNULL)
        assert result.returncode == 0, "make deb failed:\n%s%s" % (
            result.stdout[-3000:], result.stderr[-3000:])
        deb = result.stdout.strip().splitlines()[-1]
        assert deb.endswith("_%s-%s_all.deb" % (setup_cfg_version(), revision)), deb
        assert os.path.isfile(deb), deb
        _BUILT[revision] = (deb, time.monotonic() - started)
    return _BUILT[revision][0]


def build_seconds(revision=1):
    return _BUILT[revision][1]


def lintian(deb):
    return admin("lintian", "--fail-on", "error,warning", deb, timeout=600)


class Package:
    """The installed package, and what the test saw of it."""

    def __init__(self):
        self.pids = set()  # every master pid read from the pidfile: cleanup stops them

    admin = staticmethod(admin)

    def dpkg(self, *args):
        """dpkg as an admin runs it, keeping edited conffiles; the result (checked)."""
        return admin("dpkg", "--force-confold", *args, check=True)

    def master_pid(self):
        """The running master's pid from the pidfile, or None."""
        try:
            with open(PIDFILE) as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            return None
        self.pids.add(pid)
        return pid if pid_alive(pid) else None

    def wait_running(self, timeout=30):
        return wait_for(self.master_pid, timeout, interval=0.1, what="amproxy's master")

    def log(self):
        try:
            with open(LOG_FILE, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def wait_log(self, predicate, timeout=15, what="a log line"):
        return wait_for(lambda: predicate(self.log()), timeout, interval=0.1, what=what)


def _is_amproxy(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return b"/usr/bin/amproxy" in f.read()
    except OSError:
        return False


def _stop_seen(pids):
    """Stop what the package ran and the test saw (by pidfile), if it still runs."""
    victims = [pid for pid in pids if pid_alive(pid) and _is_amproxy(pid)]
    for pid in list(victims):
        victims += [child for child in children_of(pid) if _is_amproxy(child)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: not any(pid_alive(pid) for pid in victims), 10, interval=0.1,
                     what="amproxy to exit")
            return


def remove_everything(package=None):
    """Purge the package, stop what it ran, delete the amproxy user and group, and
    remove whatever is left of it (on a host that had none of it before)."""
    pids = set(package.pids) if package else set()
    if package is not None:
        package.master_pid()
    if package_status():
        admin("dpkg", "--purge", "amproxy")
    if package_status():  # half-installed: force it out
        admin("dpkg", "--purge", "--force-remove-reinstreq", "--force-depends", "amproxy")
    _stop_seen(pids | (package.pids if package else set()))
    remove_paths(leftovers())
    remove_amproxy_user()


def remove_paths(paths):
    """Remove what an install put down (a test's cleanup, on a host that had none of it)."""
    for path in paths:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.unlink(path)


def remove_amproxy_user():
    if amproxy_user():
        admin("deluser", "--system", "--quiet", "amproxy")
    if admin("getent", "group", "amproxy").returncode == 0:
        admin("delgroup", "--system", "--quiet", "amproxy")


@contextlib.contextmanager
def installed_package(deb, config_text):
    """Write /etc/amproxy/amproxy.conf, then ``dpkg -i --force-confold deb`` (the
    admin's config is kept); afterwards, remove every trace, whatever happened."""
    package = Package()
    try:
        os.makedirs(os.path.dirname(CONFIG_FILE), exist_ok=True)
        with open(CONFIG_FILE, "w") as f:
            f.write(config_text)
        package.dpkg("-i", deb)
        yield package
    finally:
        remove_everything(package)
