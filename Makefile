# fastmeta: `make demo` (set up, build, run the main job) and `make test`.
# Both create .venv with torch (>= 2.13), build fastmeta._C into it and check what
# was built. FASTMETA_CUDA=1 demands the CUDA kernels (CI), 0 skips them.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SOURCES := $(shell find csrc -type f) setup.py pyproject.toml fastmeta/_build.py

.PHONY: demo test fuzz lint build clean sanitize install-matrix reproduce-omniglot

# make demo [OMNIGLOT=DIR]: short training runs of every algorithm on synthetic tasks
# (fastmeta's backend against the reference one), ProtoNet on Omniglot when given a
# directory, then the quick benchmark table.
demo: $(VENV)/.built
	$(PY) -m fastmeta.cli.demo $(if $(OMNIGLOT),--omniglot "$(OMNIGLOT)")
	$(PY) -m fastmeta.bench --quick

test: $(VENV)/.built
	$(PY) -m pytest -q tests

# make reproduce-omniglot OMNIGLOT=DIR [REPRODUCE="--only protonet"]: every README Omniglot
# recipe trained and tested, one combined table in runs/reproduce-omniglot (hours; not CI).
reproduce-omniglot: $(VENV)/.built
	$(PY) -m fastmeta reproduce omniglot --data-dir "$(OMNIGLOT)" $(REPRODUCE)

# The fuzz suite's long profile (tests/test_fuzz.py; `make test` runs its short one):
# FUZZ_EXAMPLES examples per op and backend, fresh random seeds each run.
FUZZ_EXAMPLES ?= 400
fuzz: $(VENV)/.built
	FASTMETA_FUZZ=long FASTMETA_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q tests/test_fuzz.py

# ruff's lint rules and its formatter in check mode (pyproject.toml [tool.ruff]) over the
# whole tree (fix: `ruff format`), clang-format (.clang-format) over csrc/: it fails on any
# file it would reformat (fix: `clang-format -i` on the file), then mypy on the op layer
# (pyproject.toml [tool.mypy]). The formatters and mypy are pinned: versions differ.
CLANG_FORMAT_VERSION := 23.1.5
MYPY_VERSION := 2.4.1
RUFF_VERSION := 0.17.6
CXX_SOURCES = $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')
lint: $(VENV)/.deps
	@$(PY) -m ruff --version 2> /dev/null | grep -q " $(RUFF_VERSION)$$" \
		|| $(PY) -m pip install -q "ruff==$(RUFF_VERSION)"
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	@$(VENV)/bin/clang-format --version 2> /dev/null | grep -q " $(CLANG_FORMAT_VERSION)\b" \
		|| $(PY) -m pip install -q "clang-format==$(CLANG_FORMAT_VERSION)"
	$(VENV)/bin/clang-format --dry-run --Werror $(CXX_SOURCES)
	@$(PY) -m mypy --version 2> /dev/null | grep -q " $(MYPY_VERSION)\b" \
		|| $(PY) -m pip install -q "mypy==$(MYPY_VERSION)"
	$(PY) -m mypy

build: $(VENV)/.built

# higher==0.2.1 (pure Python) is installed with --no-deps, so it cannot pull another torch:
# tests/test_compat_higher.py compares fastmeta.compat.higher with it.
$(VENV)/.deps:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "torch>=2.13" numpy pytest hypothesis ninja pillow matplotlib "ruff==$(RUFF_VERSION)" \
		"clang-format==$(CLANG_FORMAT_VERSION)" "mypy==$(MYPY_VERSION)" "setuptools>=64" wheel
	$(PY) -m pip install -q --no-deps higher==0.2.1
	touch $@

# The build log keeps every compiler line; the summary shows each source compiled.
$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	@echo "building fastmeta._C (full log: $(VENV)/build.log)"
	@$(PY) -m pip install -v --no-build-isolation --no-deps -e . > $(VENV)/build.log 2>&1 \
		|| { tail -n 60 $(VENV)/build.log; echo "fastmeta build failed"; exit 1; }
	@grep -E "^ *fastmeta:" $(VENV)/build.log | sort -u || true
	@awk '$$1 ~ /^\[[0-9]+\/[0-9]+\]$$/ { src = ""; for (i = 1; i <= NF; i++) if ($$i == "-c") src = $$(i + 1); \
		n = split($$2, tool, "/"); print "  compiled", $$1, tool[n], src }' $(VENV)/build.log
	@$(PY) -c "import fastmeta; print(fastmeta.backends())"
	@touch $@

# make sanitize: the C++ CPU kernels built with AddressSanitizer and UBSan (setup.py,
# FASTMETA_SANITIZE=1: -O1 -g, frame pointers; no CUDA) into build/sanitize beside a
# copy of the package's Python files (the normal build is left alone), then the tests
# that drive the C++ CPU kernels run against it, under the sanitizer runtimes. Python is
# not instrumented: libasan is preloaded, and libstdc++ with it (else ASan cannot find
# the real __cxa_throw and aborts at the first C++ exception: "CHECK failed ...
# real___cxa_throw"); leak detection is off (Python's own allocations); the first report
# stops the run (pytest captures sys.stdout/err only, so the report reaches the terminal).
# Not part of `make test` or CI: 2 to 6 minutes on the 2-core VM, plus 5 for the first build.
SANITIZE_DIR := build/sanitize
SANITIZE_TESTS := test_kernel_entry_guards.py test_conformance.py test_protonet.py \
	test_cosine_similarities_kernels.py test_inner_update.py test_metanet_ops.py \
	test_conv_block.py test_bn_relu_pool.py test_hardening.py test_maml.py test_metanet.py \
	test_mixed_precision.py
# The C++ backend only: no Triton (its interpreter), no torch.compile, no reference backend.
SANITIZE_SELECT := not triton and not compile and not reference-cpu
sanitize: $(VENV)/.deps
	rm -rf $(SANITIZE_DIR)/fastmeta && mkdir -p $(SANITIZE_DIR)
	cp -r fastmeta $(SANITIZE_DIR)/ && rm -f $(SANITIZE_DIR)/fastmeta/_C*.so
	FASTMETA_SANITIZE=1 FASTMETA_CUDA=0 $(PY) setup.py -q build_ext \
		--build-lib $(SANITIZE_DIR) --build-temp $(SANITIZE_DIR)/temp
	cd $(SANITIZE_DIR) && \
		LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libstdc++.so)" \
		ASAN_OPTIONS=detect_leaks=0:halt_on_error=1 \
		UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
		$(abspath $(PY)) -m pytest -q --capture=sys -p no:cacheprovider -k "$(SANITIZE_SELECT)" \
		$(addprefix $(CURDIR)/tests/,$(SANITIZE_TESTS))

# make install-matrix (CI runs it): installs fastmeta as users do, into fresh venvs, and
# tests each (tests/test_packaging.py, FASTMETA_INSTALL_TESTS=1): `python -m build` (sdist
# and wheel, isolated), pip install without torch (the message), a Python below the floor
# (refused), the CUDA torch of .venv with the wheel built here (`pip wheel
# --no-build-isolation`: it reuses the objects of the build above, so only links) and
# OLD_TORCH (CPU-only) with a plain `pip install .` and the compile on first use; each
# runs a smoke test and the op tests. Its venvs are in build/install-matrix (its own
# folder: other pytest runs prune the shared /tmp/pytest-of-$USER), removed when it passes.
# About 14 minutes on the 2-core VM (README).
OLD_TORCH ?= 2.13.0
install-matrix: $(VENV)/.built
	FASTMETA_INSTALL_TESTS=1 FASTMETA_MATRIX_OLD_TORCH=$(OLD_TORCH) $(PY) -m pytest -q -rsP \
		--durations=0 -p no:cacheprovider --basetemp=build/install-matrix tests/test_packaging.py
	rm -rf build/install-matrix

# The next build compiles everything again (the venv and its packages stay).
clean:
	rm -rf build dist fastmeta/_C*.so fastmeta/_C.build.json *.egg-info $(VENV)/.built \
		$(VENV)/build.log
