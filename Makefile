# Everything runs from a virtual environment built from the lock file; nothing is installed by hand.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test test-tools check bench bench-tools lock clean

run: $(STAMP)
	$(BIN)/wallet serve

test: $(STAMP) test-tools
	$(BIN)/pytest $(PYTEST_ARGS)

# What the tests drive besides Python, from Debian's packages, installed here when running as root
# (as CI does) and missing: Chromium (/usr/bin/chromium) for the console's browser tests through
# Playwright, whose own browser download (`playwright install`) is never used; and PgBouncer
# (transaction mode, Debian's 1.18, what managed databases put in front), which the tests start
# themselves. Their primary + streaming replica use the machine's PostgreSQL 15 binaries, else the
# ones inside the embedded PostgreSQL wheel.
test-tools:
	@missing=""; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	command -v pgbouncer >/dev/null || [ -x /usr/sbin/pgbouncer ] || missing="$$missing pgbouncer"; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "test: installing$$missing (apt-get)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

check: $(STAMP)
	$(BIN)/ruff check
	$(BIN)/ruff format --check
	$(BIN)/mypy

bench: $(STAMP) bench-tools
	$(BIN)/python -m bench.run $(BENCH_ARGS)

# The load generator is wrk, from Debian's packages: installed here when running as root; otherwise
# the bench falls back to a slower Python generator and says so. pgbench (the raw-SQL ceiling) is
# the machine's, else the one shipped inside the embedded PostgreSQL wheel.
bench-tools: test-tools
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! command -v wrk >/dev/null; then \
		echo "bench: installing wrk (apt-get)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; \
	fi

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is required"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --require-hashes -r requirements.lock
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

# Re-resolve after editing pyproject.toml: writes uv.lock and the hashed requirements.lock pip installs from.
lock: $(STAMP)
	$(BIN)/pip install --quiet uv
	$(BIN)/uv lock
	$(BIN)/uv export --frozen --all-groups --no-emit-project --format requirements-txt -o requirements.lock

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
