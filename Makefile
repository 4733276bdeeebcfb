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

.PHONY: all venv run test bench install clean

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
		--metrics-per-key 100 --workers 1 2 --repeats 3 --latency $(BENCH_ARGS)
	$(BIN)/python bench/bench.py --lines 1000000 --workers 2 --repeats 3 \
		--bad-fraction 0.1 --no-baseline --big-auth-keys 100000 $(BENCH_ARGS)

# The package and its command under $(DESTDIR)$(PREFIX), the config, init
# script, defaults, logrotate and systemd files under $(DESTDIR). An existing
# config or auth file is never overwritten.
install:
	$(PYTHON) -m pip install --quiet --disable-pip-version-check --no-deps --ignore-installed \
		--root "$(DESTDIR)/" --prefix "$(PREFIX)" .
	$(INSTALL) -d -m 0755 "$(DESTDIR)$(SYSCONFDIR)/amproxy"
	test -e "$(DESTDIR)$(SYSCONFDIR)/amproxy/amproxy.conf" || \
		$(INSTALL) -m 0644 etc/amproxy.conf "$(DESTDIR)$(SYSCONFDIR)/amproxy/amproxy.conf"
	test -e "$(DESTDIR)$(SYSCONFDIR)/amproxy/auth_file.yaml" || \
		$(INSTALL) -m 0640 etc/auth_file.yaml "$(DESTDIR)$(SYSCONFDIR)/amproxy/auth_file.yaml"
	$(INSTALL) -D -m 0755 etc/init.d/amproxy "$(DESTDIR)$(SYSCONFDIR)/init.d/amproxy"
	test -e "$(DESTDIR)$(SYSCONFDIR)/default/amproxy" || \
		$(INSTALL) -D -m 0644 etc/default/amproxy "$(DESTDIR)$(SYSCONFDIR)/default/amproxy"
	$(INSTALL) -D -m 0644 etc/logrotate.d/amproxy "$(DESTDIR)$(SYSCONFDIR)/logrotate.d/amproxy"
	$(INSTALL) -D -m 0644 systemd/amproxy.service "$(DESTDIR)$(SYSTEMD_UNIT_DIR)/amproxy.service"
	$(INSTALL) -D -m 0644 systemd/amproxy.socket "$(DESTDIR)$(SYSTEMD_UNIT_DIR)/amproxy.socket"

clean:
	rm -rf $(VENV) run build *.egg-info .pytest_cache .hypothesis
