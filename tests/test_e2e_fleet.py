"""The auth file as a running server holds it: one snapshot mapped by every process,
replaced whole on reload, and every key in it usable, whatever the file's layout."""
import os
import signal
import time

from conftest import (KEYS, SECRETS_USED, children_of, free_port, line_for, wait_for, wait_points,
                      write_auth)


def snapshot_mappings(pid):
    with open("/proc/%d/maps" % pid) as f:
        return sum("amproxy-auth" in line for line in f)


def open_descriptors(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def test_reloads_leave_one_snapshot_mapped_and_no_descriptor_behind(carbon, auth_file,
                                                                    make_proxy):
    proxy = make_proxy(carbon.address, auth_file, args=["--auth-reload-interval", "1h"])
    now = int(time.time())
    for i in range(8):  # several connections, so both workers build keys
        proxy.send(line_for(KEYS, "alpha", "e2e.alpha.temp", i, now - 50 - i))
    wait_points(carbon, "e2e.alpha.temp", {now - 50 - i: float(i) for i in range(8)}, now - 60)
    processes = [proxy.pid] + proxy.workers()
    descriptors = {pid: open_descriptors(pid) for pid in processes}
    keys = dict(KEYS)
    for i in range(12):
        keys["fleet%d" % i] = ("fleet-secret-%d" % i, ["e2e.fleet.k%d" % i])
        write_auth(auth_file, keys)
        # Half the reloads asked of the master, half of a worker (passed on to all).
        proxy.signal(signal.SIGHUP) if i % 2 else os.kill(processes[1 + i % 2], signal.SIGHUP)
        proxy.wait_log(r"auth file reloaded.*reason=SIGHUP", count=2 * (i + 1))
        proxy.send(line_for(keys, "fleet%d" % i, "e2e.fleet.k%d" % i, i, now - 10))
        wait_points(carbon, "e2e.fleet.k%d" % i, {now - 10: float(i)}, now - 20)
    # Exactly one reload per HUP, wherever it was sent.
    assert proxy.log().count("auth file reloaded") == 24
    for pid in processes:
        assert snapshot_mappings(pid) == 1, "pid %d maps old snapshots" % pid
        assert open_descriptors(pid) == descriptors[pid], "pid %d leaks descriptors" % pid


YAML_ONLY = """\
apikeys:
  "site:1":
    secret_key: "two words, then a # sign"
    metrics: ["e2e.site.temp"]
  plain: {secret_key: plain-fleet-secret, metrics: [e2e.plain.temp]}
"""


def test_a_file_only_yaml_reads_serves_every_key(carbon, auth_file, make_proxy):
    auth_file.write_text(YAML_ONLY)
    SECRETS_USED.update(["two words, then a # sign", "plain-fleet-secret"])
    keys = {"site:1": ("two words, then a # sign", []), "plain": ("plain-fleet-secret", [])}
    proxy = make_proxy(carbon.address, auth_file)
    now = int(time.time())
    for i in range(4):
        proxy.send(line_for(keys, "site:1", "e2e.site.temp", i, now - 30 - i))
        proxy.send(line_for(keys, "plain", "e2e.plain.temp", i, now - 30 - i))
    expected = {now - 30 - i: float(i) for i in range(4)}
    wait_points(carbon, "e2e.site.temp", expected, now - 40)
    wait_points(carbon, "e2e.plain.temp", expected, now - 40)
    # The snapshot's escapes are not a way in: "site\3a1" is no key of this file.
    proxy.send(line_for({"site\\3a1": ("two words, then a # sign", [])}, "site\\3a1",
                        "e2e.site.temp", 99, now - 5))
    proxy.wait_log(r"reason=unknownKey", timeout=10)


def test_a_fleet_file_serves_its_first_middle_and_last_device(carbon, auth_file, make_proxy):
    count = 5000
    keys = {"device-%05d" % k: ("fleet-device-secret-%05d" % k, ["e2e.fleet.d%05d" % k])
            for k in range(count)}
    write_auth(auth_file, keys)
    proxy = make_proxy(carbon.address, auth_file)
    now = int(time.time())
    chosen = ["device-00000", "device-02500", "device-%05d" % (count - 1)]
    for name in chosen:
        proxy.send(line_for(keys, name, keys[name][1][0], 7, now - 20))
    for name in chosen:
        wait_points(carbon, keys[name][1][0], {now - 20: 7.0}, now - 30)
    # A device writing another device's series is refused.
    proxy.send(line_for(keys, "device-00001", "e2e.fleet.d00002", 1, now - 20))
    proxy.wait_log(r"reason=metricNotAllowed", timeout=10)


def test_an_auth_file_that_is_not_a_regular_file_is_refused_and_keys_stay(carbon, auth_file,
                                                                         make_proxy):
    proxy = make_proxy(carbon.address, auth_file)
    os.unlink(auth_file)
    os.mkfifo(auth_file)  # reading it would block for ever
    proxy.wait_log(r"auth file %s is not a regular file.*keeping the 2 keys" % auth_file,
                   count=2, timeout=10)
    now = int(time.time())
    proxy.send(line_for(KEYS, "beta", "e2e.beta.temp", 5, now - 70))
    wait_points(carbon, "e2e.beta.temp", {now - 70: 5.0}, now - 80)
    wait_for(lambda: proxy.process.poll() is None, 1, "the master to be alive")


def slow_to_read(path, keys=60000):
    """A valid auth file only the YAML parser reads (flow style): seconds to compile."""
    path.write_text("apikeys:\n" + "".join(
        '  "dev%d": {secret_key: "slow secret %d", metrics: [a.b%d]}\n' % (i, i, i)
        for i in range(keys)))


def test_the_master_stops_and_respawns_while_a_large_file_compiles(carbon, auth_file,
                                                                  make_proxy):
    proxy = make_proxy(carbon.address, auth_file)
    workers = proxy.workers()
    slow_to_read(auth_file)
    for _ in range(6):  # more than the master queues: none may crowd out what follows
        proxy.signal(signal.SIGHUP)
        time.sleep(0.05)
    os.kill(workers[0], signal.SIGKILL)
    proxy.wait_log(r'msg="worker started"', count=3, timeout=3)  # replaced meanwhile
    assert "auth file reloaded" not in proxy.log()  # still compiling
    started = time.monotonic()
    proxy.signal(signal.SIGTERM)
    wait_for(lambda: proxy.process.poll() is not None, 4, what="the master to stop")
    assert time.monotonic() - started < 4
    assert "received SIGTERM" in proxy.log()


def test_a_compile_that_dies_is_tried_again(carbon, auth_file, make_proxy):
    proxy = make_proxy(carbon.address, auth_file)
    workers = set(proxy.workers())
    slow_to_read(auth_file)
    compiler = wait_for(lambda: [pid for pid in children_of(proxy.pid) if pid not in workers],
                        5, what="the process compiling the new file")[0]
    os.kill(compiler, signal.SIGKILL)
    proxy.wait_log(r"the process reading it failed \(status -9\); keeping the 2 keys",
                   count=2)
    # The file was not judged: the next check compiles it again, and it loads.
    proxy.wait_log(r"auth file reloaded.*keys=60000", count=2, timeout=30)


def cpu_seconds(pid):
    fields = open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_the_master_sleeps_through_a_long_graceful_stop(auth_file, make_proxy):
    """Its next auth-file check is not a deadline to wake for while stopping (it once
    spun at 100% CPU until the workers were done)."""
    proxy = make_proxy("127.0.0.1:%d" % free_port(), auth_file, workers=1,
                       args=["--graceful-timeout", "5s"])
    proxy.send(line_for(KEYS, "alpha", "e2e.alpha.temp", 1))  # held: no Carbon to take it
    proxy.wait_log(r"keeping lines until it is back", timeout=10)
    before = cpu_seconds(proxy.pid)
    proxy.signal(signal.SIGTERM)
    time.sleep(3)  # the worker waits for Carbon until its graceful timeout
    assert proxy.process.poll() is None, "the stop should still be going on"
    assert cpu_seconds(proxy.pid) - before < 0.5
