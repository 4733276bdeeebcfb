# amproxy: make run | make test | make bench | make install
# carbon-cache (for the tests and make run) needs Python 3.11; take it when present.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
# make install: the usual variables of distribution packaging.
PREFIX ?= /usr/local
DESTDIR ?=
SYSCONFDIR ?= /etc
SYSTEMD_UNIT_DIR ?= /lib/systemd/system
INSTALL ?= install

# The benchmark of the README's performance section; BENCH_ARGS adds to it.
BENCH_ARGS ?=

# The version's one place; make install writes it into the installed package.
VERSION := $(shell sed -n 's/^version *= *//p' setup.cfg)

.PHONY: all venv run test bench install uninstall clean

all: venv

# One virtualenv with amproxy (editable), the test tools and a real carbon-cache.
# GRAPHITE_NO_PREFIX keeps carbon inside the virtualenv instead of /opt/graphite.
$(VENV)/.installed: setup.cfg setup.py requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	GRAPHITE_NO_PREFIX=True $(BIN)/pip install --quiet --disable-pip-version-check \
		-e . -r requirements-test.txt
	touch $@

venv: $(VENV)/.installed

run: venv
	$(BIN)/python tools/demo.py

test: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: venv
	$(BIN)/python bench/bench.py --lines 1000000 --connections 4 --keys 10 \
		--metrics-per-key 100 --workers 1 2 --repeats 3 --latency --scale-out --rate-limit --tls \
		$(BENCH_ARGS)
	$(BIN)/python bench/bench.py --lines 1000000 --workers 2 --repeats 3 \
		--bad-fraction 0.1 --no-baseline --big-auth-keys 100000 --big-auth-workers 4 \
		--flood 30000 $(BENCH_ARGS)
	$(BIN)/python bench/bench.py --fleet-only --storm 10000 --churn 20000 --tls-churn 2000 \
		--workers 1 2 --repeats 3 $(BENCH_ARGS)

# make install: amproxy for the system's Python, the way a Debian sysadmin runs it.
# The runtime dependencies come from Debian (see DEBIAN_PACKAGES); the package
# goes to a directory of its own, so no Python path scheme (Debian's
# dist-packages, posix_local) decides whether it is found.  An existing config,
# defaults file or auth file is never overwritten.
INSTALL_PYTHON ?= /usr/bin/python3
BINDIR ?= $(PREFIX)/bin
LIBDIR ?= $(PREFIX)/lib/amproxy
MANDIR ?= $(PREFIX)/share/man
DAEMON_USER ?= amproxy
# A real install makes the daemon's user; a staged one (DESTDIR) leaves it to the package.
CREATE_USER ?= $(if $(DESTDIR),no,yes)
DEBIAN_PACKAGES := python3 python3-yaml python3-configargparse python3-pythonjsonlogger
# Where each installed file names the command and its config.
SUBST = sed -e 's|/usr/bin/amproxy|$(BINDIR)/amproxy|g' -e 's|/etc/|$(SYSCONFDIR)/|g'

install:
	@$(INSTALL_PYTHON) -c 'import yaml, configargparse, pythonjsonlogger' \
		|| { echo "amproxy needs its dependencies for $(INSTALL_PYTHON): apt-get install $(DEBIAN_PACKAGES)" >&2; exit 1; }
	$(INSTALL) -d -m 0755 "$(DESTDIR)$(LIBDIR)/amproxy" "$(DESTDIR)$(BINDIR)" \
		"$(DESTDIR)$(MANDIR)/man1"
	$(INSTALL) -m 0644 amproxy/*.py "$(DESTDIR)$(LIBDIR)/amproxy/"
	printf '"""Written by make install from setup.cfg."""\nversion = "%s"\n' "$(VERSION)" \
		> "$(DESTDIR)$(LIBDIR)/amproxy/_version.py"
	chmod 0644 "$(DESTDIR)$(LIBDIR)/amproxy/_version.py"
	@# amproxy(1), from the option declarations (which is why the dependencies are needed).
	$(INSTALL_PYTHON) -B tools/manpage.py > "$(DESTDIR)$(MANDIR)/man1/amproxy.1"
	chmod 0644 "$(DESTDIR)$(MANDIR)/man1/amproxy.1"
	sed -e 's|@PYTHON@|$(INSTALL_PYTHON)|' -e 's|@LIBDIR@|$(LIBDIR)|' bin/amproxy.in \
		> "$(DESTDIR)$(BINDIR)/amproxy"
	chmod 0755 "$(DESTDIR)$(BINDIR)/amproxy"
	$(INSTALL) -d -m 0755 "$(DESTDIR)$(SYSCONFDIR)/amproxy"
	test -e "$(DESTDIR)$(SYSCONFDIR)/amproxy/amproxy.conf" || \
		$(INSTALL) -m 0644 etc/amproxy.conf "$(DESTDIR)$(SYSCONFDIR)/amproxy/amproxy.conf"
	test -e "$(DESTDIR)$(SYSCONFDIR)/amproxy/auth_file.yaml" || \
		$(INSTALL) -m 0640 etc/auth_file.installed.yaml "$(DESTDIR)$(SYSCONFDIR)/amproxy/auth_file.yaml"
	$(INSTALL) -d -m 0755 "$(DESTDIR)$(SYSCONFDIR)/init.d" "$(DESTDIR)$(SYSCONFDIR)/default" \
		"$(DESTDIR)$(SYSCONFDIR)/logrotate.d" "$(DESTDIR)$(SYSTEMD_UNIT_DIR)"
	$(SUBST) etc/init.d/amproxy > "$(DESTDIR)$(SYSCONFDIR)/init.d/amproxy"
	chmod 0755 "$(DESTDIR)$(SYSCONFDIR)/init.d/amproxy"
	test -e "$(DESTDIR)$(SYSCONFDIR)/default/amproxy" || \
		$(SUBST) etc/default/amproxy > "$(DESTDIR)$(SYSCONFDIR)/default/amproxy"
	$(SUBST) etc/logrotate.d/amproxy > "$(DESTDIR)$(SYSCONFDIR)/logrotate.d/amproxy"
	$(SUBST) systemd/amproxy.service > "$(DESTDIR)$(SYSTEMD_UNIT_DIR)/amproxy.service"
	$(INSTALL) -m 0644 systemd/amproxy.socket "$(DESTDIR)$(SYSTEMD_UNIT_DIR)/amproxy.socket"
	@# A real install (no DESTDIR) also gets the daemon's user, which may read the keys.
	test $(CREATE_USER) = no || getent passwd $(DAEMON_USER) > /dev/null || \
		adduser --system --group --quiet --home /var/lib/amproxy --no-create-home $(DAEMON_USER)
	test $(CREATE_USER) = no || chgrp $(DAEMON_USER) "$(SYSCONFDIR)/amproxy/auth_file.yaml"
	test -n "$(DESTDIR)" || "$(BINDIR)/amproxy" --version

# Removes what install put down; a config, defaults or auth file that differs
# from the shipped one is kept, and so are the spool, the logs and the user.
uninstall:
	rm -rf "$(DESTDIR)$(LIBDIR)"
	rm -f "$(DESTDIR)$(BINDIR)/amproxy" "$(DESTDIR)$(SYSCONFDIR)/init.d/amproxy" \
		"$(DESTDIR)$(MANDIR)/man1/amproxy.1" \
		"$(DESTDIR)$(SYSCONFDIR)/logrotate.d/amproxy" \
		"$(DESTDIR)$(SYSTEMD_UNIT_DIR)/amproxy.service" "$(DESTDIR)$(SYSTEMD_UNIT_DIR)/amproxy.socket"
	! cmp -s etc/amproxy.conf "$(DESTDIR)$(SYSCONFDIR)/amproxy/amproxy.conf" || \
		rm -f "$(DESTDIR)$(SYSCONFDIR)/amproxy/amproxy.conf"
	! cmp -s etc/auth_file.installed.yaml "$(DESTDIR)$(SYSCONFDIR)/amproxy/auth_file.yaml" || \
		rm -f "$(DESTDIR)$(SYSCONFDIR)/amproxy/auth_file.yaml"
	! $(SUBST) etc/default/amproxy | cmp -s - "$(DESTDIR)$(SYSCONFDIR)/default/amproxy" || \
		rm -f "$(DESTDIR)$(SYSCONFDIR)/default/amproxy"
	rmdir "$(DESTDIR)$(SYSCONFDIR)/amproxy" 2>/dev/null || true

clean:
	rm -rf $(VENV) run build *.egg-info .pytest_cache .hypothesis
