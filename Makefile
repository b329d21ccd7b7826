# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CORE   := $(wildcard src/shmkit/_core/*.c src/shmkit/_core/*.h)
SO     := src/shmkit/.core-built

.PHONY: all build demo test stress asan-copy bench bench-compare asan wheel wheel-test clean

all: build

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q --no-build-isolation -e '.[test]'
	touch $@

$(SO): $(STAMP) $(CORE)
	$(BIN)/python setup.py -q build_ext --inplace
	touch $@

build: $(SO)

demo: build
	$(BIN)/shmkit demo

# The suite runs on a worker per core (pytest-xdist), at most four: its tests
# wait on processes more than they compute.  PARALLEL= runs it in one process.
PARALLEL ?= -n auto --maxprocesses 4

# Types first: the annotations and stubs (mypy --strict), then the stubs against
# the compiled module (stubtest; stubtest-allowlist.txt lists what it cannot see).
# tests/test_redis.py runs a real redis-server: installed with apt when missing.
test: build
	command -v redis-server >/dev/null || (apt-get update -qq && apt-get install -y -qq redis-server)
	$(BIN)/python -m mypy --strict src/shmkit
	$(BIN)/python -m mypy.stubtest shmkit --allowlist stubtest-allowlist.txt
	$(BIN)/python -m pytest -q -m "not stress" $(PARALLEL) tests

# The long runs; then the core fuzzer's million cases per kind under
# AddressSanitizer (tests/test_fuzz_core.py): its children import an ASan copy
# of the package from build/asan, so the in-place build stays as it is.
ASAN_PRELOAD = ASAN_OPTIONS=detect_leaks=0 LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)"
stress: build asan-copy
	$(BIN)/python -m pytest -q -m stress tests -s --ignore=tests/test_fuzz_core.py
	$(ASAN_PRELOAD) SHMKIT_TEST_PATH=$(CURDIR)/build/asan \
		$(BIN)/python -m pytest -q -m stress -p no:cacheprovider tests/test_fuzz_core.py -s

# The package with its core built with ASan and UBSan, in build/asan.
asan-copy: $(STAMP) $(CORE)
	rm -rf build/asan && mkdir -p build/asan
	cp -r src/shmkit build/asan/shmkit
	rm -f build/asan/shmkit/*.so build/asan/shmkit/.core-built
	SHMKIT_ASAN=1 $(BIN)/python setup.py -q build_ext --build-lib build/asan \
		--build-temp build/asan-tmp --force

# faster-fifo ships as source only: Cython must be there to build it, as
# shmkit itself installs without build isolation.
bench: build
	$(BIN)/pip install -q 'cython>=3'
	$(BIN)/pip install -q -e '.[bench]' --no-build-isolation
	command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server; } \
		|| echo "redis-server could not be installed: the Redis anchors will be skipped"
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

# shmkit's own figures here against another commit, alternating in one sitting:
# `make bench-compare BASE=HEAD~1` (see benchmarks/README.md).
BASE ?= HEAD~1
bench-compare: build
	$(BIN)/python -m benchmarks.compare $(BASE) $(BENCH_ARGS)

# The tests under AddressSanitizer: run once per change to the C code.
asan: $(STAMP)
	rm -f $(SO)
	SHMKIT_ASAN=1 $(BIN)/python setup.py -q build_ext --inplace --force
	ASAN_OPTIONS=detect_leaks=0 LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
		$(BIN)/python -m pytest -q -m "not stress" -p no:cacheprovider $(PARALLEL) tests; \
	status=$$?; $(BIN)/python setup.py -q build_ext --inplace --force && touch $(SO); exit $$status

# A binary wheel, repaired and tagged manylinux by auditwheel, in wheelhouse/.
# `build/` is removed first so that no in-place or sanitizer build gets packed.
wheel: $(STAMP)
	$(BIN)/pip install -q --no-build-isolation -e '.[wheel]'
	rm -rf build dist wheelhouse
	$(BIN)/pip wheel -q --no-deps -w dist .
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/auditwheel repair -w wheelhouse dist/shmkit-*.whl
	@ls wheelhouse

# That wheel installed into a fresh virtualenv outside the source tree, and the
# test suite run against it (SHMKIT_TEST_INSTALLED=1: children do not get src/).
WHEEL_VENV ?= $(or $(TMPDIR),/tmp)/shmkit-wheel-test
wheel-test: wheel
	rm -rf $(WHEEL_VENV)
	$(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/pip install -q "$$(ls wheelhouse/shmkit-*.whl)[test]"
	cd $(WHEEL_VENV) && SHMKIT_TEST_INSTALLED=1 bin/python -m pytest -q -m "not stress" \
		-p no:cacheprovider --rootdir=$(CURDIR) $(CURDIR)/tests

clean:
	rm -rf build dist wheelhouse $(VENV) src/shmkit/*.so $(SO) src/*.egg-info
