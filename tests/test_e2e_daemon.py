"""amproxy as a classic Unix daemon: signals, pidfile, detaching, privileges, systemd."""
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest

from conftest import (AMPROXY, KEYS, ROOT, SECRETS_USED, auth_yaml, children_of, free_port,
                      line_for, make_install_under, pid_alive, wait_for, wait_points,
                      write_auth)


def test_ttin_and_ttou_change_the_number_of_workers(carbon, auth_file, make_proxy):
    proxy = make_proxy(carbon.address, auth_file, workers=2)
    proxy.signal(signal.SIGTTIN)
    proxy.wait_workers(3)
    proxy.signal(signal.SIGTTOU)
    proxy.wait_workers(2)
    for count in range(2, 5):
        proxy.signal(signal.SIGTTOU)
        # One at a time: two pending signals of a kind would merge into one.
        proxy.wait_log("received SIGTTOU", count=count)
    proxy.wait_workers(1)  # and not fewer: the last TTOU has been handled
    assert len(proxy.workers()) == 1
    assert_forwards(carbon, proxy, 11.0)


def assert_forwards(carbon, proxy, value):
    ts = int(time.time()) - int(value) % 200
    proxy.send(line_for(KEYS, "alpha", "e2e.alpha.temp", value, ts))
    wait_points(carbon, "e2e.alpha.temp", {ts: value}, ts)


def test_hup_ttin_ttou_usr2_sent_to_a_worker_do_not_kill_it(carbon, auth_file, make_proxy):
    proxy = make_proxy(carbon.address, auth_file, workers=1)
    worker = proxy.workers()[0]
    for sig in (signal.SIGUSR2, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU):
        os.kill(worker, sig)
    proxy.wait_log(r"pid=%d .*auth file reloaded.*reason=SIGHUP" % worker)
    assert proxy.workers() == [worker]
    assert_forwards(carbon, proxy, 12.0)


def proxy_with_config(carbon, auth_file, make_proxy, conf, text):
    """A proxy whose worker count comes from config file ``conf``, started with ``text``."""
    conf.write_text(text)
    proxy = make_proxy(carbon.address, auth_file, args=["--config", str(conf)],
                       workers=None)
    proxy.wait_workers(2)
    return proxy


def test_hup_rereads_workers_and_skew_from_the_config_file(carbon, auth_file, make_proxy,
                                                           tmp_path):
    conf = tmp_path / "amproxy.conf"
    proxy = proxy_with_config(carbon, auth_file, make_proxy, conf, "workers = 2\nskew = 1h\n")
    now = int(time.time())
    proxy.send(line_for(KEYS, "beta", "e2e.beta.temp", 61, now - 600))
    wait_points(carbon, "e2e.beta.temp", {now - 600: 61.0}, now - 600)
    conf.write_text("workers = 3\nskew = 30s\nlog-level = info\n")
    proxy.signal(signal.SIGHUP)
    proxy.wait_workers(3)
    proxy.wait_log(r"config reloaded.*changed=.*skew")
    proxy.wait_log(r"options re-read.*skew=30", count=2)  # the two older workers
    proxy.send(line_for(KEYS, "beta", "e2e.beta.temp", 62, now - 120))
    proxy.wait_log(r"reason=skew.*public_key=beta")
    assert now - 120 not in carbon.points("e2e.beta.temp", now - 130)


def test_bad_config_on_hup_keeps_the_running_options(carbon, auth_file, make_proxy,
                                                     tmp_path):
    conf = tmp_path / "amproxy.conf"
    proxy = proxy_with_config(carbon, auth_file, make_proxy, conf, "workers = 2\n")
    conf.write_text("workers = many\n")
    proxy.signal(signal.SIGHUP)
    proxy.wait_log(r"auth file reloaded", count=2)  # both workers handled the HUP
    # Parsed once, by the master: one error, naming the file.
    assert len(re.findall(r"config file %s not reloaded, keeping the running options.*"
                          r"workers" % re.escape(str(conf)), proxy.log())) == 1, proxy.log()
    assert len(proxy.workers()) == 2
    assert_forwards(carbon, proxy, 13.0)


def test_usr1_reopens_the_log_file(carbon, auth_file, make_proxy, tmp_path):
    log_file = tmp_path / "amproxy.log"
    proxy = make_proxy(carbon.address, auth_file, args=["--log-file", str(log_file)])
    wait_for(lambda: log_file.exists() and "amproxy started" in log_file.read_text(), 5,
             what="the log file")
    rotated = tmp_path / "amproxy.log.1"
    os.rename(log_file, rotated)
    proxy.signal(signal.SIGUSR1)
    wait_for(log_file.exists, 5, what="a new log file")
    proxy.signal(signal.SIGHUP)  # makes the master and every worker log
    wait_for(lambda: log_file.read_text().count("auth file reloaded") >= 2, 5,
             what="workers logging to the new file")
    assert "received SIGHUP" in log_file.read_text()
    assert "received SIGHUP" not in rotated.read_text()


def test_quit_is_a_fast_stop_and_int_a_graceful_one(carbon, auth_file, make_proxy):
    fast = make_proxy(carbon.address, auth_file)
    client = fast.connect()  # an open client does not delay a fast stop
    started = time.monotonic()
    fast.signal(signal.SIGQUIT)
    assert fast.wait_exit(10) == 0
    assert time.monotonic() - started < 3
    client.close()
    graceful = make_proxy(carbon.address, auth_file)
    now = int(time.time())
    with graceful.connect() as sock:
        sock.sendall(line_for(KEYS, "beta", "e2e.beta.temp", 71, now - 90))
        graceful.signal(signal.SIGINT)
        assert graceful.wait_exit(40) == 0
    wait_points(carbon, "e2e.beta.temp", {now - 90: 71.0}, now - 90)


def test_worker_that_cannot_start_stops_the_master(carbon, auth_file, make_proxy,
                                                   tmp_path):
    spool = tmp_path / "spool"  # the master finds it usable; a worker's own part is not
    spool.mkdir()
    (spool / "worker-0").write_text("")
    proxy = make_proxy(carbon.address, auth_file, start=False,
                       args=["--spool-dir", str(spool)])
    proxy.start(wait=False)
    assert proxy.wait_exit(20) == 3
    log = proxy.log()
    assert "cannot use spool directory %s" % (spool / "worker-0") in log
    assert "stopping instead of respawning" in log
    assert log.count('msg="worker failed to start') <= 2  # no respawn loop


# -- pidfile and --daemon -------------------------------------------------------------

def read_pid(path):
    with open(path) as f:
        return int(f.read())


def test_pidfile_life_cycle(carbon, auth_file, make_proxy, tmp_path):
    pidfile = tmp_path / "amproxy.pid"
    # A stale pidfile: its process is gone.
    dead = subprocess.Popen(["true"])
    dead.wait()
    pidfile.write_text("%d\n" % dead.pid)
    proxy = make_proxy(carbon.address, auth_file, args=["--pidfile", str(pidfile)])
    wait_for(lambda: read_pid(pidfile) == proxy.pid, 5, what="the pidfile")
    # A second instance refuses to start while the first runs.
    second = make_proxy(carbon.address, auth_file, args=["--pidfile", str(pidfile)],
                        start=False)
    second.start(wait=False)
    assert second.wait_exit(20) == 1
    assert "pidfile %s names a running amproxy (pid %d)" % (pidfile, proxy.pid) in second.log()
    assert read_pid(pidfile) == proxy.pid
    proxy.signal(signal.SIGTERM)
    assert proxy.wait_exit(40) == 0
    assert not pidfile.exists()


def test_pidfile_naming_another_program_is_stale(carbon, auth_file, make_proxy, tmp_path):
    pidfile = tmp_path / "amproxy.pid"
    other = subprocess.Popen(["sleep", "30"])
    try:
        pidfile.write_text("%d\n" % other.pid)
        proxy = make_proxy(carbon.address, auth_file, args=["--pidfile", str(pidfile)])
        wait_for(lambda: read_pid(pidfile) == proxy.pid, 5, what="the pidfile")
    finally:
        other.kill()
        other.wait()


@pytest.fixture
def daemon_cleanup():
    """Kill daemons (which left our process group) by the pid in their pidfile."""
    pidfiles = []
    yield pidfiles
    for path in pidfiles:
        try:
            pid = read_pid(path)
        except (OSError, ValueError):
            continue
        for child in children_of(pid):
            os.kill(child, signal.SIGKILL)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_daemon_detaches_and_stops_through_its_pidfile(carbon, auth_file, tmp_path,
                                                       daemon_cleanup):
    pidfile = tmp_path / "amproxy.pid"
    log_file = tmp_path / "amproxy.log"
    daemon_cleanup.append(pidfile)
    port = free_port()
    result = subprocess.run([AMPROXY, "server", "--daemon", "--pidfile", str(pidfile),
                             "--log-file", str(log_file), "--addr", "127.0.0.1:%d" % port,
                             "--carbon-addr", carbon.address, "--auth-file", str(auth_file),
                             "--workers", "2"], capture_output=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"" and result.stderr == b""
    wait_for(pidfile.exists, 10, what="the pidfile")
    master = read_pid(pidfile)
    wait_for(lambda: len(children_of(master)) == 2, 10, what="two workers")
    with open("/proc/%d/stat" % master) as f:
        _, _, pgrp, session, tty = f.read().rsplit(")", 1)[1].split()[:5]
    pgrp, session, tty = int(pgrp), int(session), int(tty)
    # A session of its own, led by the intermediate process that exited, so the
    # master can never acquire a controlling terminal.  (This test's own session
    # id may read 0 when its leader is outside the PID namespace, as under CI.)
    assert session not in (0, os.getsid(0), master) and pgrp == session and tty == 0
    assert [os.readlink("/proc/%d/fd/%d" % (master, fd)) for fd in (0, 1, 2)] == \
        [os.devnull] * 3
    now = int(time.time())
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(line_for(KEYS, "beta", "e2e.beta.temp", 81, now - 70))
    wait_points(carbon, "e2e.beta.temp", {now - 70: 81.0}, now - 70)
    workers = children_of(master)
    os.kill(master, signal.SIGTERM)
    wait_for(lambda: not any(pid_alive(p) for p in [master] + workers), 40,
             what="the daemon to stop")
    assert not pidfile.exists()
    assert "amproxy stopped" in log_file.read_text()


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_user_nobody_runs_the_workers_unprivileged(carbon, make_proxy):
    # nobody must be able to read the auth file: a directory of its own.
    directory = tempfile.mkdtemp(prefix="amproxy-nobody-")
    try:
        os.chmod(directory, 0o755)
        auth = os.path.join(directory, "auth.yaml")
        write_auth(auth, KEYS)
        os.chown(auth, 0, pwd.getpwnam("nobody").pw_gid)
        os.chmod(auth, 0o640)
        proxy = make_proxy(carbon.address, auth, args=["--user", "nobody"])
        nobody = pwd.getpwnam("nobody").pw_uid
        for pid in [proxy.pid] + proxy.workers():
            with open("/proc/%d/status" % pid) as f:
                uids = next(line for line in f if line.startswith("Uid:")).split()[1:]
            assert {int(u) for u in uids} == {nobody}
        assert_forwards(carbon, proxy, 14.0)
        proxy.signal(signal.SIGHUP)  # the auth file is still readable after the drop
        proxy.wait_log(r"auth file reloaded.*reason=SIGHUP", count=2)
        assert "keeping the" not in proxy.log()
    finally:
        shutil.rmtree(directory)


# -- systemd ----------------------------------------------------------------------------

def test_systemd_notify_ready_reloading_stopping(carbon, auth_file, make_proxy, tmp_path):
    path = str(tmp_path / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(path)
    listener.settimeout(10)
    try:
        proxy = make_proxy(carbon.address, auth_file, env={"NOTIFY_SOCKET": path},
                           start=False)
        proxy.start(wait=False)
        ready = listener.recv(4096).decode()
        assert ready.startswith("READY=1")
        assert len(proxy.workers()) == 2  # sent once the workers are up
        proxy.signal(signal.SIGHUP)
        reloading = listener.recv(4096).decode()
        assert reloading.startswith("RELOADING=1") and "MONOTONIC_USEC=" in reloading
        assert listener.recv(4096).decode() == "READY=1"
        proxy.signal(signal.SIGTERM)
        assert listener.recv(4096).decode() == "STOPPING=1"
        assert proxy.wait_exit(40) == 0
    finally:
        listener.close()


def test_systemd_notify_abstract_socket(carbon, auth_file, make_proxy):
    name = "amproxy-test-%d" % os.getpid()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind("\0" + name)
    listener.settimeout(10)
    try:
        proxy = make_proxy(carbon.address, auth_file, env={"NOTIFY_SOCKET": "@" + name},
                           start=False)
        proxy.start(wait=False)
        assert listener.recv(4096).decode().startswith("READY=1")
    finally:
        listener.close()


def test_socket_activation_through_listen_fds(carbon, auth_file, tmp_path):
    activated = socket.socket()
    activated.bind(("127.0.0.1", 0))
    activated.listen(16)
    port = activated.getsockname()[1]
    # --addr names a port that is taken: binding it would fail, so success
    # shows that the inherited socket was used.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        log_path = tmp_path / "activated.log"
        command = ('LISTEN_PID=$$ LISTEN_FDS=1 exec %s server --addr 127.0.0.1:%d '
                   '--carbon-addr %s --auth-file %s --workers 2' % (
                       AMPROXY, taken.getsockname()[1], carbon.address, auth_file))
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                ["sh", "-c", command], stdout=log, stderr=log, start_new_session=True,
                pass_fds=(3,), preexec_fn=lambda: os.dup2(activated.fileno(), 3))
        try:
            activated.close()
            wait_for(lambda: len(children_of(process.pid)) == 2, 10, what="workers")
            now = int(time.time())
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(line_for(KEYS, "beta", "e2e.beta.temp", 91, now - 80))
            wait_points(carbon, "e2e.beta.temp", {now - 80: 91.0}, now - 80)
            assert "addr=127.0.0.1:%d" % port in log_path.read_text()
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(40)


# -- the init script ---------------------------------------------------------------------

@pytest.mark.skipif(not shutil.which("start-stop-daemon") or
                    not os.path.exists("/lib/lsb/init-functions"),
                    reason="needs Debian's start-stop-daemon and lsb-base")
def test_init_script_against_a_destdir_install(carbon, tmp_path, daemon_cleanup):
    """make install under a prefix of its own (this interpreter, no daemon user)."""
    prefix = tmp_path / "root"
    make_install_under(prefix)
    etc = prefix / "etc"
    daemon_path = str(prefix / "usr" / "bin" / "amproxy")
    installed_keys = etc / "amproxy" / "auth_file.yaml"
    assert "apikeys: {}" in installed_keys.read_text()  # a default install accepts nothing
    write_auth(installed_keys, {"my_public_key": ("my_secret_key", ["metric1"])})
    port = free_port()
    conf = etc / "amproxy" / "amproxy.conf"
    conf.write_text("addr = 127.0.0.1:%d\ncarbon-addr = %s\nauth-file = %s\nworkers = 2\n"
                    % (port, carbon.address, etc / "amproxy" / "auth_file.yaml"))
    pidfile = tmp_path / "run" / "amproxy.pid"
    log_file = tmp_path / "log" / "amproxy.log"
    defaults = etc / "default" / "amproxy"
    assert "DAEMON=%s\n" % daemon_path in defaults.read_text()  # where it was installed
    with open(defaults, "a") as f:
        f.write('RUN_AS_USER=\nPIDFILE=%s\nLOG_FILE=%s\nCONFIG_FILE=%s\n' % (
            pidfile, log_file, conf))
    daemon_cleanup.append(pidfile)
    env = dict(os.environ, AMPROXY_DEFAULTS=str(defaults))
    for name in ("AMPROXY_CONFIG", "PYTHONPATH"):
        env.pop(name, None)
    script = str(etc / "init.d" / "amproxy")

    def init(action):
        return subprocess.run([script, action], env=env, capture_output=True, text=True,
                              timeout=60)

    assert init("start").returncode == 0
    # start returns once the workers are ready: no waiting here.
    master = read_pid(pidfile)
    assert len(children_of(master)) == 2
    with open("/proc/%d/cmdline" % master, "rb") as f:
        assert daemon_path.encode() in f.read()  # the installed copy runs
    assert init("status").returncode == 0
    assert init("start").returncode == 0  # already running: no second copy
    assert read_pid(pidfile) == master
    # The key the operator added forwards.
    now = int(time.time())
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(line_for({"my_public_key": ("my_secret_key", [])}, "my_public_key",
                              "metric1", 42, now - 60))
    wait_points(carbon, "metric1", {now - 60: 42.0}, now - 60)
    assert init("reload").returncode == 0
    wait_for(lambda: "received SIGHUP" in log_file.read_text(), 10, what="the reload")
    workers = children_of(master)
    assert init("stop").returncode == 0
    assert not any(pid_alive(p) for p in [master] + workers)
    assert init("status").returncode == 3


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="needs systemd's tools")
def test_the_unit_is_hardened_and_verifies(tmp_path):
    """systemd-analyze's exposure score at most 2.5, and `verify` without complaint."""
    unit = tmp_path / "amproxy.service"
    with open(os.path.join(ROOT, "systemd", "amproxy.service")) as f:
        # verify wants the command to exist; the score does not depend on it.
        unit.write_text(f.read().replace("/usr/bin/amproxy", "/bin/true"))
    score = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)],
                           capture_output=True, text=True, timeout=60)
    exposure = re.search(r"Overall exposure level for amproxy.service: ([\d.]+)", score.stdout)
    assert exposure, score.stdout + score.stderr
    print("systemd-analyze security: %s" % exposure.group(1))
    assert float(exposure.group(1)) <= 2.5
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                            text=True, timeout=60)
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr


@pytest.mark.skipif(not os.path.exists("/lib/lsb/init-functions"), reason="needs lsb-base")
def test_init_script_exit_codes_when_amproxy_is_not_installed(tmp_path):
    """LSB: 5 for an action on a program that is not there, status 4, 3 for an unknown one."""
    defaults = tmp_path / "defaults"
    defaults.write_text("DAEMON=%s\n" % (tmp_path / "missing" / "amproxy"))
    env = dict(os.environ, AMPROXY_DEFAULTS=str(defaults))
    script = os.path.join(ROOT, "etc", "init.d", "amproxy")

    def init(action):
        return subprocess.run(["sh", script, action], env=env, capture_output=True, text=True,
                              timeout=60)
    for action, code in (("start", 5), ("restart", 5), ("status", 4), ("stop", 0),
                         ("frobnicate", 3)):
        result = init(action)
        assert result.returncode == code, (action, result.stdout, result.stderr)
        if code:
            assert result.stderr.strip(), "exit %d without a word" % code
    # Installed but not running: reload is 7.
    defaults.write_text("DAEMON=/bin/true\nPIDFILE=%s\n" % (tmp_path / "none.pid"))
    assert init("reload").returncode == 7


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
@pytest.mark.parametrize("what", ["auth file", "spool directory"])
def test_start_fails_when_the_daemon_user_cannot_use_a_file(carbon, tmp_path, what):
    """Root reads the auth file at start; the workers, as --user, reload it later."""
    directory = tempfile.mkdtemp(prefix="amproxy-nobody-")
    try:
        os.chmod(directory, 0o755)
        auth = os.path.join(directory, "auth.yaml")
        write_auth(auth, KEYS)
        spool = os.path.join(directory, "spool")
        os.mkdir(spool, 0o700)  # root's
        if what == "auth file":
            os.chmod(auth, 0o600)  # root's alone
        else:
            os.chown(auth, 0, pwd.getpwnam("nobody").pw_gid)
            os.chmod(auth, 0o640)
        result = subprocess.run([AMPROXY, "server", "--addr", "127.0.0.1:%d" % free_port(),
                                 "--carbon-addr", carbon.address, "--auth-file", auth,
                                 "--spool-dir", spool, "--user", "nobody"],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 1, result.stderr
        expected = auth if what == "auth file" else spool
        assert "%s %s" % (what, expected) in result.stderr and "nobody" in result.stderr, \
            result.stderr
    finally:
        shutil.rmtree(directory)


def slow_auth_file(path, extra_keys, filler=30000):
    """KEYS and ``extra_keys``, plus ``filler`` keys in flow style: outside the standard
    layout, so the master's compile goes through YAML and takes a second or two."""
    keys = dict(KEYS, **extra_keys)
    SECRETS_USED.update(secret for secret, _ in keys.values())
    text = auth_yaml(keys) + "".join(
        '  "filler%d": {secret_key: "filler-secret-%d", metrics: ["e2e.filler.k%d"]}\n'
        % (i, i, i) for i in range(filler))
    tmp = str(path) + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o600)
    os.rename(tmp, path)


def test_a_hup_during_a_compile_then_a_file_change_still_applies_the_live_options(
        carbon, auth_file, make_proxy, tmp_path):
    conf = tmp_path / "amproxy.conf"
    slow_auth_file(auth_file, {})
    proxy = proxy_with_config(carbon, auth_file, make_proxy, conf,
                              "workers = 2\nskew = 5m\nauth-reload-interval = 0.1s\n")
    proxy.wait_log(r"workers ready")
    compiles = lambda: len(children_of(proxy.pid)) - 2  # noqa: E731
    slow_auth_file(auth_file, {"gamma": ("gamma-secret", ["e2e.gamma.temp"])})
    wait_for(lambda: compiles() == 1, 10, what="the compile of the changed file")
    conf.write_text("workers = 2\nskew = 1h\nauth-reload-interval = 0.1s\n")
    proxy.signal(signal.SIGHUP)  # during the compile: queued
    proxy.wait_log(r"config reloaded.*changed=skew")
    slow_auth_file(auth_file, {"gamma": ("gamma-secret", ["e2e.gamma.temp"]),
                               "delta": ("delta-secret", ["e2e.delta.temp"])})
    assert compiles() == 1, "the first compile ended too soon for this test"
    # The poll sees the second change during the same compile.
    proxy.wait_log(r"auth file reloaded.*keys=30004", count=2, timeout=30)
    now = int(time.time())
    proxy.send(line_for(KEYS, "beta", "e2e.beta.temp", 63, now - 1800))  # in 1h, not 5m
    wait_points(carbon, "e2e.beta.temp", {now - 1800: 63.0}, now - 1800)
