"""make install as the README says, on this machine's real /, with Debian's Python.

The test installs into /usr/local and /etc, runs the installed command and the
init script exactly as a sysadmin would (a clean environment, no PYTHONPATH,
and a PATH whose first python3 is not Debian's), then removes everything it
put down, even when it fails.  It runs only as root, with Debian's
interpreter and the Debian packages the README names, and only on a host
with no amproxy installed (it would never touch one).
"""
import json
import os
import resource
import shutil
import socket
import subprocess
import time

import pytest

from conftest import AMPROXY, ROOT, free_port, wait_points
from debpkg import amproxy_user, remove_amproxy_user, remove_paths

DEBIAN_PYTHON = "/usr/bin/python3"
INSTALLED = ["/usr/local/bin/amproxy", "/usr/local/lib/amproxy", "/etc/amproxy",
             "/usr/local/share/man/man1/amproxy.1",
             "/etc/init.d/amproxy", "/etc/default/amproxy", "/etc/logrotate.d/amproxy",
             "/lib/systemd/system/amproxy.service", "/var/log/amproxy", "/run/amproxy",
             "/var/lib/amproxy"]


def _deps_missing():
    if not os.path.exists(DEBIAN_PYTHON):
        return True
    return subprocess.run([DEBIAN_PYTHON, "-c", "import yaml, configargparse, pythonjsonlogger"],
                          capture_output=True).returncode != 0


pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="installs into / (needs root)"),
    pytest.mark.skipif(_deps_missing(), reason="needs Debian's python3 with python3-yaml, "
                       "python3-configargparse and python3-pythonjsonlogger"),
    pytest.mark.skipif(any(os.path.lexists(p) for p in INSTALLED) or amproxy_user(),
                       reason="amproxy is installed on this host; the test never touches it"),
    pytest.mark.skipif(not shutil.which("start-stop-daemon"), reason="needs Debian's dpkg"),
]


def as_admin(*argv, path_first=None, **kwargs):
    """A root shell's environment: nothing from this test's virtualenv."""
    path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    env = {"PATH": (path_first + ":" + path) if path_first else path, "LANG": "C.UTF-8",
           "HOME": "/root"}
    return subprocess.run(list(argv), env=env, capture_output=True, text=True, timeout=300,
                          **kwargs)


@pytest.fixture
def installed(tmp_path):
    """make install, and afterwards make uninstall plus what the test itself added."""
    other_python = tmp_path / "otherbin"
    other_python.mkdir()
    for name in ("python3", "python3.11", "python"):  # an admin's PATH with another Python
        fake = other_python / name
        fake.write_text("#!/bin/sh\necho 'not the python make install should use' >&2\n"
                        "exit 97\n")
        fake.chmod(0o755)
    try:
        result = as_admin("make", "-C", ROOT, "install", path_first=str(other_python))
        assert result.returncode == 0, result.stdout + result.stderr
        yield
    finally:
        if os.path.exists("/etc/init.d/amproxy"):
            as_admin("/etc/init.d/amproxy", "stop")
        as_admin("make", "-C", ROOT, "uninstall")
        remove_paths(INSTALLED)
        remove_amproxy_user()


def test_make_install_then_the_init_script_as_a_sysadmin_would(carbon, installed):
    version = as_admin("amproxy", "--version")
    with open(os.path.join(ROOT, "setup.cfg")) as f:
        expected = next(line.split("=")[1].strip() for line in f if line.startswith("version"))
    assert version.returncode == 0 and version.stdout == "amproxy %s\n" % expected, \
        version.stdout + version.stderr
    if shutil.which("man"):
        manual = as_admin("man", "-l", "/usr/local/share/man/man1/amproxy.1")
        assert manual.returncode == 0 and "amproxy %s" % expected in manual.stdout
    with open("/usr/local/bin/amproxy") as f:
        assert f.readline().startswith("#!%s" % DEBIAN_PYTHON)
    with open("/etc/default/amproxy") as f:
        assert "DAEMON=/usr/local/bin/amproxy\n" in f.read()
    assert amproxy_user() is not None
    # The operator points it at Carbon and a port, and adds a device.
    port = free_port()
    with open("/etc/amproxy/amproxy.conf") as f:
        conf = f.read()
    conf = conf.replace("addr = 0.0.0.0:2005", "addr = 127.0.0.1:%d" % port).replace(
        "carbon-addr = 127.0.0.1:2003", "carbon-addr = %s" % carbon.address)
    assert "127.0.0.1:%d" % port in conf and carbon.address in conf
    with open("/etc/amproxy/amproxy.conf", "w") as f:
        f.write(conf)
    new_key = as_admin("amproxy", "keys", "new", "installtest", "--metric", "install.test.*")
    assert new_key.returncode == 0, new_key.stderr
    secret = new_key.stdout.strip()
    check = as_admin("amproxy", "auth-file", "check")
    assert check.returncode == 0 and "/etc/amproxy/auth_file.yaml" in check.stdout

    started = as_admin("/etc/init.d/amproxy", "start")
    assert started.returncode == 0, started.stdout + started.stderr
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass  # start returned: it is listening, with no wait
    assert as_admin("/etc/init.d/amproxy", "status").returncode == 0
    # Each worker takes as many devices as the open-file limit allows: the init script
    # raises it to 65536 where it may (not in every container), and the default
    # --max-connections follows it.
    with open("/run/amproxy/amproxy.pid") as f:
        pid = int(f.read())
    with open("/proc/%d/limits" % pid) as f:
        open_files = int(next(line for line in f if line.startswith("Max open files")).split()[3])
    assert open_files >= min(65536, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    with open("/var/log/amproxy/amproxy.log") as f:
        assert "max_connections=%d " % (open_files - min(128, open_files // 4)) in f.read()
    now = int(time.time())
    sent = as_admin("amproxy", "client", "send", "--server-addr", "127.0.0.1:%d" % port,
                    "--key-public", "installtest", "--key-private", secret,
                    "install.test.point", "42", str(now - 30))
    assert sent.returncode == 0, sent.stderr
    wait_points(carbon, "install.test.point", {now - 30: 42.0}, now - 30)
    stats = as_admin("amproxy", "stats")
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)["totals"]["linesForwarded"] >= 0
    log = os.stat("/var/log/amproxy/amproxy.log")
    assert log.st_mode & 0o777 == 0o640 and log.st_uid == amproxy_user().pw_uid
    assert os.stat("/var/lib/amproxy/spool").st_uid == amproxy_user().pw_uid

    stopped = as_admin("/etc/init.d/amproxy", "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert as_admin("/etc/init.d/amproxy", "status").returncode == 3
    unknown = as_admin("/etc/init.d/amproxy", "frobnicate")
    assert unknown.returncode == 3 and "Usage" in unknown.stderr

    removed = as_admin("make", "-C", ROOT, "uninstall")
    assert removed.returncode == 0, removed.stderr
    assert not os.path.exists("/usr/local/bin/amproxy")
    assert not os.path.exists("/usr/local/share/man/man1/amproxy.1")
    assert not os.path.exists("/etc/init.d/amproxy")
    assert os.path.exists("/etc/amproxy/amproxy.conf")  # edited: kept
    assert as_admin("sh", "-c", "amproxy --version").returncode == 127  # gone from PATH


@pytest.mark.skipif(os.geteuid() != 0 or os.path.lexists("/etc/amproxy"),
                    reason="writes /etc/amproxy/amproxy.conf (root, and only where none is)")
def test_the_test_harness_never_reads_the_hosts_config(carbon, make_proxy, auth_file,
                                                       tmp_path):
    """A host whose /etc already has an amproxy config: tests must not adopt it."""
    hostile_spool = tmp_path / "hostile-spool"
    hostile_log = tmp_path / "hostile.log"
    os.makedirs("/etc/amproxy")
    try:
        with open("/etc/amproxy/amproxy.conf", "w") as f:
            f.write("spool-dir = %s\nlog-file = %s\nworkers = 7\nstats-socket = %s\n" % (
                hostile_spool, hostile_log, tmp_path / "hostile.sock"))
        # The control: without the harness's protection the file is read.
        bare = dict(os.environ)
        bare.pop("AMPROXY_CONFIG")
        control = subprocess.run([AMPROXY, "stats"], env=bare, capture_output=True, text=True,
                                 timeout=30)
        assert "hostile.sock" in control.stderr
        proxy = make_proxy(carbon.address, auth_file)  # as every e2e test does
        assert len(proxy.workers()) == 2
        proxy.stop()
        assert not hostile_spool.exists() and not hostile_log.exists()
        assert "amproxy started" in proxy.log()
    finally:
        shutil.rmtree("/etc/amproxy")
