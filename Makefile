# `make train` and `make test` do all the set-up on first use: a virtual
# environment in .venv with the CPU build of torch and the project installed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: train test bench lint clean postgres fortunes browser

# The SQL tests start a PostgreSQL server of their own (initdb, pg_ctl): where the machine
# has none, the system's package is installed (Debian's postgresql; through sudo unless root)
INITDB := $(shell command -v initdb || ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | tail -1)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# The text examples and tests read the fortune files of Debian's `fortunes` package (BSD
# licence), a labelled corpus installed from the system's packages, never downloaded at run time
FORTUNES := /usr/share/games/fortunes/computers
# The serving page is tested in Debian's headless chromium through its chromedriver (Selenium
# drives it); no tool downloads a browser of its own

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: the CPU build on this machine, never a CUDA download
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

train: $(STAMP) fortunes
	$(BIN)/shardwise train

test: $(STAMP) postgres fortunes browser
	$(BIN)/python -m pytest -q

browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		echo "installing chromium and its driver from the system's packages (for the page's test)"; \
		$(SUDO) apt-get update -q && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver; \
	fi

fortunes:
	@if [ ! -f $(FORTUNES) ]; then \
		echo "installing the fortune files from the system's packages (the text corpus)"; \
		$(SUDO) apt-get update -q && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends fortunes; \
	fi

postgres:
	@if [ -z "$(INITDB)" ]; then \
		echo "installing PostgreSQL from the system's packages (for the SQL tests)"; \
		$(SUDO) apt-get update -q && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql; \
	fi

bench: $(STAMP)
	$(BIN)/shardwise bench --out bench-results

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
