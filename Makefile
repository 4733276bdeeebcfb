# amproxy: make run | make test | make bench | make install | make deb
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

.PHONY: all venv run test bench install uninstall deb lintian clean

all: venv

# One virtualenv with amproxy (editable), the test tools, a real carbon-cache
# and graphite-web (make run's graphs; it needs Debian's libcairo2 to draw them).
# GRAPHITE_NO_PREFIX keeps carbon and graphite-web inside the virtualenv instead
# of /opt/graphite.
$(VENV)/.installed: setup.cfg setup.py requirements-test.txt requirements-demo.txt
	$(PYTHON) -m venv $(VENV)
	GRAPHITE_NO_PREFIX=True $(BIN)/pip install --quiet --disable-pip-version-check \
		-e . -r requirements-test.txt -r requirements-demo.txt
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
	$(BIN)/python bench/bench.py --devices-only --devices 100000 --workers 2 --repeats 5 \
		$(BENCH_ARGS)

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
	@# A running server first: without the init script nothing would stop it.
	test -n "$(DESTDIR)" || ! test -x "$(SYSCONFDIR)/init.d/amproxy" || \
		"$(SYSCONFDIR)/init.d/amproxy" stop
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

# make deb: the Debian package, with Debian's own tools (debian/), from a copy of
# this tree under $(DEB_DIR), where the .deb lands; nothing is written outside
# it.  The version is setup.cfg's, the Debian revision DEB_REVISION's: a newer
# build of the same version is `make deb DEB_REVISION=2`.  Lintian checks the
# package when it is installed (DEB_LINTIAN=no skips it); `make lintian` runs it
# on the last build.
DEB_REVISION ?= 1
DEB_DIR ?= build/deb
DEB_LINTIAN ?= yes
DEB_VERSION = $(VERSION)-$(DEB_REVISION)
DEB_SRC = $(DEB_DIR)/amproxy-$(VERSION)
DEB_FILE = $(DEB_DIR)/amproxy_$(DEB_VERSION)_all.deb
DEB_BUILD_PACKAGES := dpkg-dev debhelper dh-python $(DEBIAN_PACKAGES)
# The changelog's date: the last commit's, so that a build of a commit is the
# same whenever it runs (now, outside a git checkout).
DEB_DATE = $(shell date -R -d @$$(git log -1 --format=%ct 2>/dev/null || date +%s))

deb:
	@command -v dpkg-buildpackage > /dev/null && command -v dh > /dev/null || \
		{ echo "make deb needs Debian's build tools: apt-get install $(DEB_BUILD_PACKAGES)" >&2; exit 1; }
	rm -rf "$(DEB_SRC)"
	mkdir -p "$(DEB_SRC)"
	tar -cf - --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./run \
		--exclude=__pycache__ --exclude=.pytest_cache --exclude=.hypothesis \
		--exclude='*.egg-info' . | tar -xf - -C "$(DEB_SRC)"
	printf 'amproxy (%s) unstable; urgency=medium\n\n  * amproxy %s, as setup.cfg says%s.\n\n -- %s  %s\n' \
		"$(DEB_VERSION)" "$(VERSION)" \
		"$$(git describe --always --dirty 2>/dev/null | sed 's/^/, built from /')" \
		"$$(sed -n 's/^Maintainer: //p' debian/control)" "$(DEB_DATE)" \
		> "$(DEB_SRC)/debian/changelog"
	@# No make variables of this make reach debian/rules (PREFIX=/usr is its own).
	cd "$(DEB_SRC)" && env -u MAKEFLAGS -u MFLAGS -u MAKELEVEL dpkg-buildpackage -b -us -uc
	rm -rf "$(DEB_SRC)"
	test "$(DEB_LINTIAN)" = no || ! command -v lintian > /dev/null || \
		lintian --fail-on error,warning "$(DEB_FILE)"
	@echo "$(DEB_FILE)"

lintian:
	lintian --fail-on error,warning "$(DEB_FILE)"

clean:
	rm -rf $(VENV) run build *.egg-info .pytest_cache .hypothesis
