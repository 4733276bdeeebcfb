"""Which devices are silent, and why, with a real carbon-cache and two workers: a
drifted clock, the old secret after a rotation's grace, a key never seen, one that
moved behind the PROXY protocol; each shown by `amproxy devices` as it is, across
a reload, and counted in the devices.* self-metrics."""
import json
import socket
import subprocess
import time

from conftest import AMPROXY, SECRETS_USED, line_for, wait_for, wait_points
from test_proxyprotocol import v2

EXPIRED = "2026-01-01T00:00:00Z"
KEYS = {
    "steady": ("steady-secret", ["dev.steady.*"]),
    "drifted": ("drifted-secret", ["dev.drifted.*"]),
    "rotated": ("rotated-new-secret", ["dev.rotated.*"]),
    "never": ("never-secret", ["dev.never.*"]),
    "mover": ("mover-secret", ["dev.mover.*"]),
    "revoked": ("revoked-secret", ["dev.revoked.*"]),
}


def auth_text(names):
    lines = ["apikeys:"]
    for name in names:
        secret, metrics = KEYS[name]
        lines += ["  %s:" % name, "    secret_key: %s" % secret]
        if name == "rotated":  # rotated, the grace over; the device still has the old one
            lines += ["    previous_secret_key: rotated-old-secret",
                      "    previous_secret_expires: %s" % EXPIRED]
        lines += ["    metrics:"] + ["      - %s" % m for m in metrics]
    return "\n".join(lines) + "\n"


def devices(proxy, *args):
    result = subprocess.run([AMPROXY, "devices", "--format", "json", "--stats-socket",
                             proxy.stats_socket] + list(args), capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return {d["key"]: d for d in json.loads(result.stdout)}


def send(proxy, data, header=b""):
    with proxy.connect() as sock:
        sock.sendall(header + data)


def test_drifted_rotated_never_seen_and_moved_devices_show_why(carbon, tmp_path, make_proxy):
    auth = tmp_path / "auth.yaml"
    auth.write_text(auth_text(KEYS))
    auth.chmod(0o600)
    SECRETS_USED.update(["rotated-old-secret"] + [s for s, _ in KEYS.values()])
    stats_socket = str(tmp_path / "stats.sock")
    proxy = make_proxy(carbon.address, auth, args=[
        "--proxy-protocol", "--stats-socket", stats_socket, "--stats-interval", "1s",
        "--stats-prefix", "e2e.devstats", "--device-silent-after", "1h"])
    proxy.stats_socket = stats_socket
    now = int(time.time())
    old_keys = dict(KEYS, rotated=("rotated-old-secret", []))
    send(proxy, line_for(KEYS, "steady", "dev.steady.t", 1, now), v2("198.51.100.1", 1000))
    send(proxy, line_for(KEYS, "drifted", "dev.drifted.t", 2, now + 432), v2("198.51.100.2", 1000))
    send(proxy, line_for(old_keys, "rotated", "dev.rotated.t", 3, now), v2("198.51.100.3", 1000))
    send(proxy, line_for(KEYS, "mover", "dev.mover.t", 4, now - 5), v2("198.51.100.4", 1000))
    # It moves: its next line comes from elsewhere once the first was taken (two workers
    # may read two lines sent a few milliseconds apart in either order).
    wait_points(carbon, "dev.mover.t", {now - 5: 4.0}, now - 10)
    send(proxy, line_for(KEYS, "mover", "dev.mover.t", 5, now - 4), v2("203.0.113.9", 2000))
    send(proxy, line_for(KEYS, "revoked", "dev.revoked.t", 6, now), v2("198.51.100.6", 1000))
    wait_points(carbon, "dev.mover.t", {now - 4: 5.0}, now - 10)

    last = []

    def shown():
        last[:] = [devices(proxy)]
        return last[0] if last[0]["mover"]["address"] == "203.0.113.9" else None
    try:
        seen = wait_for(shown, 10, interval=0.2, what="the devices recorded (once a second)")
    except TimeoutError:
        raise AssertionError("the devices as shown: %r" % last) from None
    assert seen["steady"]["accepted"] == 1 and seen["steady"]["rejected_since"] is None
    drifted = seen["drifted"]
    assert drifted["accepted"] == 0 and drifted["last_reason"] == "skew"
    assert 430 <= drifted["skew"] <= 434  # the device's clock is 7m12s ahead
    rotated = seen["rotated"]
    assert rotated["last_reason"] == "badSignature" and rotated["old_secret"] is True
    assert rotated["previous_secret_expires"] is not None
    assert seen["never"]["accepted"] == 0 and seen["never"]["last_accepted"] is None
    assert seen["mover"]["accepted"] == 2 and seen["mover"]["listener"] == "plain"
    # Nothing stored that is not ours to keep.
    text = json.dumps(seen)
    assert "secret" not in text.replace("old_secret", "").replace("previous_secret", "")
    # The filters: silent for a minute (never seen, and the two only rejected).
    assert set(devices(proxy, "--silent", "1m")) == {"drifted", "rotated", "never"}
    assert set(devices(proxy, "--rejected")) == {"drifted", "rotated"}
    assert set(devices(proxy, "--key", "mover")) == {"mover"}

    # A line naming a key without its signature says nothing of where that device is.
    with proxy.connect() as forger:
        forger.sendall(v2("192.0.2.66", 3000) + b"dev.mover.t 9 %d mover AAAA\n" % now)
        proxy.wait_log(r"reason=badSignature remote=192.0.2.66")
        time.sleep(1.5)  # two records of the device table (once a second), with it open
        forged = devices(proxy, "--key", "mover")["mover"]
    assert forged["address"] == "203.0.113.9" and forged["connected"] is False
    # A reload keeps the state of the keys that stay and drops the revoked one.
    auth.write_text(auth_text([k for k in KEYS if k != "revoked"]))
    proxy.wait_log(r"auth file reloaded.* keys=5", count=2)  # both workers
    after = wait_for(lambda: (lambda d: d if "revoked" not in d else None)(devices(proxy)),
                     10, interval=0.2, what="the revoked key dropped")
    assert after["mover"]["accepted"] == 2 and after["drifted"]["skew"] == drifted["skew"]

    # The self-metrics, per interval (to the second): the three keys with a line
    # accepted, the two with only rejected lines, none silent for an hour yet; an
    # interval without lines counts none.
    def metric(name):
        return carbon.points("e2e.devstats.devices." + name, now - 60)
    wait_for(lambda: sum(metric("seen").values()) >= 3, 20, what="devices.seen")
    wait_for(lambda: sum(metric("rejectedOnly").values()) >= 2, 20,
             what="devices.rejectedOnly")
    assert 0.0 in metric("seen").values()
    assert set(metric("silent").values()) == {0.0}

    # Its state went with it: given back, the key is a device never seen.
    auth.write_text(auth_text(KEYS))
    proxy.wait_log(r"auth file reloaded.* keys=6", count=2)
    back = wait_for(lambda: devices(proxy).get("revoked"), 10, interval=0.2,
                    what="the key given back")
    assert back["accepted"] == 0 and back["last_accepted"] is None and back["address"] is None
    # A request amproxy devices would not send is refused in a sentence, not answered.
    with socket.socket(socket.AF_UNIX) as raw:
        raw.connect(stats_socket)
        raw.sendall(b'devices {"silent": "an hour"}\n')
        raw.shutdown(socket.SHUT_WR)
        said = json.loads(raw.makefile("rb").read())
    assert said == {"error": "amproxy devices: silent must be seconds (a number from 0 to "
                    "3153600000)"}
