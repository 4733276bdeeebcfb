# amproxy: make run | make test | make bench | make install
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PREFIX ?= /usr/local
DESTDIR ?=

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

clean:
	rm -rf $(VENV) run build *.egg-info .pytest_cache .hypothesis
