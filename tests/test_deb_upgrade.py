"""The package's upgrade under load: while 1,000 devices stream signed lines to the
installed amproxy, `dpkg -i` of a newer build (its postinst runs the init script's
restart, an upgrade in place) refuses no connection, resets none, and every line a
device wrote reaches a real carbon-cache.  Runs where tests/test_deb.py runs."""
import re

from conftest import free_port, pid_alive, wait_for, write_auth
from debpkg import AUTH_FILE, admin, build_deb, installed_package, require_host
from test_e2e_upgrade import fleet_keys, stream_through


def test_dpkg_upgrade_under_a_thousand_streaming_devices_loses_nothing(carbon):
    require_host()
    old_deb, new_deb = build_deb(1), build_deb(2)
    port = free_port()
    conf = ("# tests/test_deb_upgrade.py: this host's ports only\n"
            "addr = 127.0.0.1:%d\ncarbon-addr = %s\nauth-file = %s\n"
            "spool-dir = /var/lib/amproxy/spool\nworkers = 2\n"
            % (port, carbon.address, AUTH_FILE))
    with installed_package(old_deb, conf) as package:
        package.wait_running()
        write_auth(AUTH_FILE, fleet_keys(), atomic=False)  # keeps root:amproxy 0640
        admin("/etc/init.d/amproxy", "reload", check=True)
        package.wait_log(lambda log: re.search(r"auth file reloaded.* keys=10\b", log),
                         what="the fleet's keys")
        masters = [package.master_pid()]

        def upgrade():
            package.dpkg("-i", new_deb)  # postinst: invoke-rc.d amproxy restart
            masters.append(package.wait_running())
            wait_for(lambda: not pid_alive(masters[0]), 40, what="the old master to exit")

        stream_through(port, carbon, upgrade)
        assert masters[1] != masters[0]
        assert "2" == admin("dpkg-query", "-W", "--showformat=${Version}", "amproxy",
                            check=True).stdout.rsplit("-", 1)[1]
        log = package.log()
        assert "took over the sockets" in log, log
        assert "level=err" not in log, log
