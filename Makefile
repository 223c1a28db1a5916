# Developer tasks of pddm_ext. `make test` is the command README.md gives and CI runs (.ci/run).
#
#   make test        .venv (created if missing) with torch ($(TORCH_SPEC)), the test requirements and
#                    the package (plain `pip install -e .`: editable, the extension built in place against
#                    the venv's torch by the in-tree build backend, docs/install.md), then the C++ test
#                    (CMake + ctest, build/cmake) and the Python tests (pytest)
#   make cuda-build  the CUDA compile check of CI: .venv-cuda with a CUDA build of torch, the package
#                    built with CUDA forced in a copy of the tree (build/cuda-tree, so the CPU build in
#                    pddm_ext/ is left alone), every op's CUDA kernel registered, the CPU tests run
#                    against that build. Needs no GPU, only the toolkit in CUDA_HOME.
#   make cuda-emulate  the CUDA kernels executed without a GPU (docs/emulation.md): csrc/cuda/*.cu compiled
#                    as C++ against csrc/emulation/cuda_emu.h in a copy of the tree (build/emu-tree),
#                    tests/test_cuda.py and tests/test_emulation.py run against it under the three
#                    thread orders, the tests every device shares under the first, then the
#                    self-tests: a build with one barrier of the forward tile compiled out, and one with
#                    the wait for pair_gemm's asynchronous staging copies compiled out, must fail them
#   make precision-emulated  benchmarks/precision.py on the emulated kernels (the error of each float32
#                    matmul precision) into benchmarks/results/precision_emulated/
#   make cuda-resources  ptxas -v figures (registers, spills, stack, shared memory), resident blocks per
#                    SM and 64-bit divisions in the PTX of every kernel on sm_90 into
#                    benchmarks/results/cuda_resources.txt (needs only nvcc and the CPU torch)
#   make cuda-resources-check  the same compile; fails on a spill, a stack frame or a 64-bit div/rem
#                    outside the per-tile tile decoding (run by cuda-build, i.e. in CI)
#   make clean       build outputs; `make distclean` also removes the virtual environments
#
# Re-running is cheap: every install step leaves a stamp in its venv and runs again only when its
# inputs change (TORCH_SPEC, requirements-test.txt, setup.py, pyproject.toml, csrc/).

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := test

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
REQUIREMENTS ?= requirements-test.txt
PYTEST_ARGS ?= -ra --benchmark-disable
JOBS ?= $(shell nproc 2>/dev/null || echo 2)
# Warnings in our own sources are errors in CI (CI=true), plain warnings elsewhere.
WERROR ?= $(if $(filter true 1,$(CI)),1,0)
PIP_FLAGS ?= --progress-bar off

CMAKE_DIR := build/cmake

CUDA_VENV ?= .venv-cuda
# torchvision built for that torch: the resnet18 backbone tests run in this venv (on the CPU).
CUDA_TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
CUDA_HOME ?= /usr/local/cuda-13.0
TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
CUDA_TREE := build/cuda-tree
CUDA_TEMP := build/cuda-temp

# Tools the venv provides (ninja for torch's extension builder, cmake where the machine has none).
export PATH := $(abspath $(VENV))/bin:$(PATH)

CSRC := $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.h)

.PHONY: test install cpp-test pytest cuda-build cuda-clean cuda-no-gpu-check cuda-emulate precision-emulated cuda-resources cuda-resources-check clean distclean FORCE demo compare \
  fonts icons bench gpu-check gpu-wheels wheel pip-check oldest-torch

test: install cpp-test pytest

# ---- Virtual environments ------------------------------------------------------------------------
# $(call venv_rules,VENV,TORCH_SPEC): create the venv, remember the torch spec it was set up with
# (the file changes only when the spec does), install torch and the requirements in one pip
# command, so that no requirement can pull in another torch.
define venv_rules
$(1)/bin/python:
	$$(PYTHON) -m venv $(1)

$(1)/.torch-spec: FORCE | $(1)/bin/python
	@echo '$(2)' | cmp -s - $$@ || echo '$(2)' > $$@

$(1)/.deps-stamp: $(1)/.torch-spec $$(REQUIREMENTS)
	$(1)/bin/python -m pip install $$(PIP_FLAGS) -r $$(REQUIREMENTS) $(foreach spec,$(2),'$(spec)')
	touch $$@
endef

$(eval $(call venv_rules,$(VENV),$(TORCH_SPEC)))
$(eval $(call venv_rules,$(CUDA_VENV),$(CUDA_TORCH_SPEC)))

# ---- The package and its tests -------------------------------------------------------------------
# Editable install: pddm_ext/_C*.so is built in place; Python edits need no reinstall. Rebuilt when
# a C++ source, the build files or torch change, or when the .so is gone. The command README.md gives
# (pip's default build isolation: the build backend finds the venv's torch); --no-deps: the
# requirements are installed above, with torch in the same pip command.
install: $(VENV)/.package-stamp
$(VENV)/.package-stamp: $(VENV)/.deps-stamp setup.py pyproject.toml build_backend/pddm_ext_build.py $(CSRC) $(if $(wildcard pddm_ext/_C*.so),,FORCE)
	PDDM_EXT_WERROR=$(WERROR) MAX_JOBS=$(JOBS) \
	  $(VENV)/bin/python -m pip install $(PIP_FLAGS) --no-deps -e .
	touch $@

# A new torch means a fresh CMake build directory.
$(CMAKE_DIR)/.torch-stamp: $(VENV)/.deps-stamp
	rm -rf $(CMAKE_DIR)
	mkdir -p $(CMAKE_DIR)
	touch $@

cpp-test: $(CMAKE_DIR)/.torch-stamp
	command -v cmake >/dev/null || $(VENV)/bin/python -m pip install $(PIP_FLAGS) cmake
	cmake -S . -B $(CMAKE_DIR) -DPDDM_EXT_WERROR=$(if $(filter 1,$(WERROR)),ON,OFF) \
	  -DCMAKE_PREFIX_PATH="$$($(VENV)/bin/python -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')"
	cmake --build $(CMAKE_DIR) -j $(JOBS)
	ctest --test-dir $(CMAKE_DIR) --output-on-failure

# pytest exits with 5 when it collects no tests: not a failure of the code under test.
run_pytest = rc=0; $(1) -m pytest $(PYTEST_ARGS) || rc=$$?; \
  if [ $$rc -eq 5 ]; then echo "pytest collected no tests (exit 5): treated as a pass"; rc=0; fi; exit $$rc

# .venv has the pretrained extra and scikit-image (requirements-test.txt): their tests must not skip there.
pytest: $(VENV)/.package-stamp
	export PDDM_EXT_REQUIRE_PRETRAINED=1; $(call run_pytest,$(VENV)/bin/python)

# ---- CUDA build check (CI) -----------------------------------------------------------------------
# The copy of the tree holds what git tracks plus untracked files it does not ignore (in CI: exactly
# the commit). It is rewritten on every run; sources keep their times and the objects live outside
# it (build/cuda-temp), so ninja recompiles only what changed. build_ext --inplace is what
# `pip install -e` runs, minus pip's throw-away build directory (a full rebuild every time).
cuda-build: $(CUDA_VENV)/.deps-stamp
	test -x '$(CUDA_HOME)/bin/nvcc' || { echo "cuda-build: no nvcc in CUDA_HOME=$(CUDA_HOME)"; exit 1; }
	$(MAKE) --no-print-directory cuda-no-gpu-check
	$(MAKE) --no-print-directory cuda-resources-check CUDA_RESOURCES_PYTHON='$(abspath $(CUDA_VENV))/bin/python'
	rm -rf $(CUDA_TREE)
	mkdir -p $(CUDA_TREE) $(CUDA_TEMP)
	git ls-files -z --cached --others --exclude-standard \
	  | tar --null --ignore-failed-read -T - -cf - | tar -xf - -C $(CUDA_TREE)
	cd $(CUDA_TREE) && PATH="$(abspath $(CUDA_VENV))/bin:$$PATH" PDDM_EXT_CUDA=1 CUDA_HOME='$(CUDA_HOME)' \
	  TORCH_CUDA_ARCH_LIST='$(TORCH_CUDA_ARCH_LIST)' PDDM_EXT_WERROR=1 MAX_JOBS=$(JOBS) \
	  '$(abspath $(CUDA_VENV))/bin/python' setup.py -q build_ext --inplace --build-temp '$(abspath $(CUDA_TEMP))'
	# The venv finds the package in the tree through a .pth entry (what `pip install -e` would add),
	# so that subprocesses of the tests (torchrun, python -c) import this build too.
	site=$$('$(abspath $(CUDA_VENV))/bin/python' -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	  echo '$(abspath $(CUDA_TREE))' > "$$site/pddm_ext_cuda_tree.pth"
	cd $(CUDA_TREE) && '$(abspath $(CUDA_VENV))/bin/python' .ci/check_cuda_build.py
	cd $(CUDA_TREE) && { export PDDM_EXT_REQUIRE_TORCHVISION=1; $(call run_pytest,'$(abspath $(CUDA_VENV))/bin/python'); }

# cuda-no-gpu-check: the build's decisions on this machine as it is (a CUDA torch, a toolkit of its
# CUDA version, no GPU visible), without compiling (setup.py --version only plans): with PDDM_EXT_CUDA
# and TORCH_CUDA_ARCH_LIST unset the CPU kernels, said in one line; PDDM_EXT_CUDA=1 without an
# architecture stops with the line that names TORCH_CUDA_ARCH_LIST (docs/install.md).
NO_GPU_ENV = env -u TORCH_CUDA_ARCH_LIST -u PDDM_EXT_CUDA_EMULATION -u PDDM_EXT_CUDA CUDA_VISIBLE_DEVICES= CUDA_HOME='$(CUDA_HOME)'

cuda-no-gpu-check:
	$(NO_GPU_ENV) '$(abspath $(CUDA_VENV))/bin/python' setup.py --version 2>&1 \
	  | grep -F 'pddm-ext: building the CPU kernels only (no GPU visible and TORCH_CUDA_ARCH_LIST unset'
	if out=$$($(NO_GPU_ENV) PDDM_EXT_CUDA=1 '$(abspath $(CUDA_VENV))/bin/python' setup.py --version 2>&1); then \
	  echo "cuda-no-gpu-check: PDDM_EXT_CUDA=1 without an architecture did not stop"; exit 1; fi; \
	  echo "$$out" | grep -F "pddm-ext: PDDM_EXT_CUDA=1 but no GPU is visible to take the architectures from: set TORCH_CUDA_ARCH_LIST"

# ---- CUDA emulation (CI) -------------------------------------------------------------------------
# The kernels of csrc/cuda/ run on the CPU: one build (the .venv's CPU torch, no toolkit), the CUDA
# tests under each thread order of EMU_ORDERS, then two self-test builds, each of whose runs of the
# scores tests must fail under at least one order (.ci/check_emulation.py): the barrier after phase
# 1b of the forward tile compiled out (PDDM_EXT_TEST_DROP_TILE_BARRIER), and the wait for pair_gemm's
# asynchronous staging copies compiled out (PDDM_EXT_TEST_DROP_COPY_WAIT: the copies never land, so
# the staged weights read as the emulation's poison).
EMU_TREE := build/emu-tree
EMU_TEMP := build/emu-temp
EMU_BROKEN_TREE := build/emu-broken-tree
EMU_BROKEN_TEMP := build/emu-broken-temp
EMU_NOWAIT_TREE := build/emu-nowait-tree
EMU_NOWAIT_TEMP := build/emu-nowait-temp
EMU_ORDERS ?= forward reverse random:1
# Run on the emulated kernels (the device `emulated` of tests/helpers.py): what only the CUDA kernels have
# (tests/test_cuda.py) and the emulator's own tests (tests/test_emulation.py) under every order; once, under
# the first order, the tests every device shares (scores, gradients, mining, the unit forms, the per-pair
# numerics, the sizes at the tiles' edges with the launch grids), which take longer than the rest together (the self-tests below run their scores test under
# every order; test_cuda.py's precision, half-input and determinism tests run the same kernels under every
# order).
EMU_TESTS ?= tests/test_cuda.py tests/test_emulation.py
EMU_ONCE_TESTS ?= tests/test_scores.py tests/test_autograd.py tests/test_mining.py tests/test_forms.py tests/test_numerics.py tests/test_tile_edges.py
EMU_PYTEST_ARGS ?= -q -ra -p no:cacheprovider --benchmark-disable

# $(call copy_tree,DIR): DIR holds what git tracks plus untracked files it does not ignore.
define copy_tree
rm -rf $(1)
mkdir -p $(1)
git ls-files -z --cached --others --exclude-standard \
  | tar --null --ignore-failed-read -T - -cf - | tar -xf - -C $(1)
endef

# $(call emu_build,TREE,TEMP,EXTRA_ENV)
define emu_build
$(call copy_tree,$(1))
mkdir -p $(2)
cd $(1) && PDDM_EXT_CUDA_EMULATION=1 $(3) PDDM_EXT_WERROR=$(WERROR) MAX_JOBS=$(JOBS) \
  '$(abspath $(VENV))/bin/python' setup.py -q build_ext --inplace --build-temp '$(abspath $(2))'
endef

cuda-emulate: $(VENV)/.deps-stamp
	$(call emu_build,$(EMU_TREE),$(EMU_TEMP),)
	cd $(EMU_TREE) && '$(abspath $(VENV))/bin/python' .ci/check_emulation.py --build
	once='$(EMU_ONCE_TESTS)'; for order in $(EMU_ORDERS); do \
	  echo "::: emulated CUDA kernels, PDDM_EMU_ORDER=$$order"; \
	  (cd $(EMU_TREE) && PDDM_EMU_ORDER=$$order PYTHONPATH=. '$(abspath $(VENV))/bin/python' -m pytest $(EMU_PYTEST_ARGS) $(EMU_TESTS) $$once) || exit 1; \
	  once=; \
	done
	$(call emu_build,$(EMU_BROKEN_TREE),$(EMU_BROKEN_TEMP),PDDM_EXT_TEST_DROP_TILE_BARRIER=1)
	cd $(EMU_BROKEN_TREE) && '$(abspath $(VENV))/bin/python' .ci/check_emulation.py --must-fail $(EMU_ORDERS)
	$(call emu_build,$(EMU_NOWAIT_TREE),$(EMU_NOWAIT_TEMP),PDDM_EXT_TEST_DROP_COPY_WAIT=1)
	cd $(EMU_NOWAIT_TREE) && '$(abspath $(VENV))/bin/python' .ci/check_emulation.py --must-fail $(EMU_ORDERS) \
	  --dropped "the wait for pair_gemm's staging copies"

# precision-emulated: benchmarks/precision.py (the error of each float32 matmul precision against the
# float64 reference, and its effect on mining) on the emulated kernels, whose tensor-core model rounds
# operands as the hardware does, into $(PRECISION_OUT) (docs/design.md#precision). ~10 min here.
PRECISION_OUT ?= benchmarks/results/precision_emulated
precision-emulated: $(VENV)/.deps-stamp
	$(call emu_build,$(EMU_TREE),$(EMU_TEMP),)
	cd $(EMU_TREE) && PYTHONPATH=. '$(abspath $(VENV))/bin/python' benchmarks/precision.py \
	  --out '$(abspath $(PRECISION_OUT))' --command 'make precision-emulated'

# ---- ptxas resource figures ----------------------------------------------------------------------
# Registers, spills, stack, shared memory, resident blocks per SM and the 64-bit div/rem in the PTX of
# every kernel for CUDA_RESOURCES_ARCH, from one `nvcc -ptx` pass per file and ptxas -v on it, with
# the torch headers of CUDA_RESOURCES_PYTHON (no GPU; the .venv's CPU torch will do). The committed
# output shows in review when a change adds registers; cuda-resources-check (run by cuda-build, so in
# CI) fails on a spill, a stack frame or a 64-bit division outside .ci/cuda_resources.py's
# ALLOWED_DIV64, and prints the kernels and source lines.
CUDA_RESOURCES_ARCH ?= sm_90
CUDA_RESOURCES_OUT ?= benchmarks/results/cuda_resources.txt
CUDA_RESOURCES_PYTHON ?= $(VENV)/bin/python

cuda-resources: $(VENV)/.deps-stamp
	test -x '$(CUDA_HOME)/bin/nvcc' || { echo "cuda-resources: no nvcc in CUDA_HOME=$(CUDA_HOME)"; exit 1; }
	mkdir -p $(dir $(CUDA_RESOURCES_OUT))
	'$(CUDA_RESOURCES_PYTHON)' .ci/cuda_resources.py --nvcc '$(CUDA_HOME)/bin/nvcc' --arch $(CUDA_RESOURCES_ARCH) \
	  > $(CUDA_RESOURCES_OUT).tmp
	mv $(CUDA_RESOURCES_OUT).tmp $(CUDA_RESOURCES_OUT)
	cat $(CUDA_RESOURCES_OUT)

cuda-resources-check:
	test -x '$(CUDA_HOME)/bin/nvcc' || { echo "cuda-resources-check: no nvcc in CUDA_HOME=$(CUDA_HOME)"; exit 1; }
	start=$$SECONDS; '$(CUDA_RESOURCES_PYTHON)' .ci/cuda_resources.py --nvcc '$(CUDA_HOME)/bin/nvcc' \
	  --arch $(CUDA_RESOURCES_ARCH) --check > /dev/null; \
	  echo "cuda-resources-check: passed in $$((SECONDS - start)) s"

# ---- Targets of other parts of the project -------------------------------------------------------
# Reserved here, written by their owners: demo, compare, fonts, bench, gpu-check
# (gpu-check: benchmarks/gpu_check.sh). Add them below this line and to .PHONY.

# demo: on a fresh machine, the venv, the package (built) and one training run with the defaults
# (glyphs, PDDMLoss) into runs/demo, which each `make demo` starts afresh (pddm-ext train itself
# refuses to overwrite a run without --resume). compare: the four losses x 5 seeds on mnist5k
# and glyphs at the budget of the committed results (benchmarks/results/compare/); finished runs
# are reused. fonts: the pinned Debian font packages the glyphs dataset renders (fonts/debian-packages.txt).
# icons: the pinned Debian icon-theme packages the icons dataset renders (icons/debian-packages.txt).
COMPARE_ARGS ?= --epochs 5 --batches-per-epoch 50
SUDO ?= $(if $(filter 0,$(shell id -u)),,sudo)

DEMO_OUT ?= runs/demo

demo: install
	rm -rf $(DEMO_OUT)
	$(VENV)/bin/pddm-ext train --out $(DEMO_OUT)

compare: install
	$(VENV)/bin/pddm-ext compare --dataset mnist5k $(COMPARE_ARGS) --out benchmarks/results/compare/mnist5k
	$(VENV)/bin/pddm-ext compare --dataset glyphs -K 4 $(COMPARE_ARGS) --out benchmarks/results/compare/glyphs

fonts:
	$(SUDO) apt-get update
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y --no-install-recommends \
	  $$(grep -v '^#' fonts/debian-packages.txt)

icons:
	$(SUDO) apt-get update
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y --no-install-recommends \
	  $$(grep -v '^#' icons/debian-packages.txt)

# bench: the benchmark suite (benchmarks/README.md): the quick run behind the README table and the
# speed and memory target checks; `make bench BENCH_ARGS=` runs the full sweep. Results: benchmarks/results/.
BENCH_ARGS ?= --quick

bench: install
	$(VENV)/bin/python -m benchmarks $(BENCH_ARGS)

# gpu-check: the one-shot check on a machine with a GPU, torch, nvcc and ninja (no venv made here, no
# network used): benchmarks/gpu_check.sh (preflight, carried wheels, CUDA build, tests/test_cuda.py,
# compute-sanitizer, precision.py, gpu_bench.py, ncu) within CHECK_BUDGET_S (360 s), results into $OUT
# or benchmarks/results/gpu/ (benchmarks/README.md, "On a GPU", gives the one remote call to make).
# gpu-wheels: the wheels gpu-check installs (pip --no-index, into build/gpu-site) where a package is not
# installed: pytorch-metric-learning and what its import needs (numpy, scipy, tqdm), --no-deps so that
# no torch comes with them, for Python GPU_WHEEL_PYTHON, downloaded here into GPU_WHEELS (.whl, ignored
# by git) for a remote run to carry; fails when they exceed GPU_CARRY_MIB (what a run may carry).
GPU_WHEELS ?= .whl
GPU_WHEEL_SPECS ?= pytorch-metric-learning==2.9.0 scipy==1.15.3 numpy==2.2.6 tqdm==4.67.1
GPU_WHEEL_PYTHON ?= 3.12
GPU_WHEEL_PLATFORMS ?= manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
GPU_CARRY_MIB ?= 64

gpu-check:
	bash benchmarks/gpu_check.sh

gpu-wheels:
	rm -rf $(GPU_WHEELS)
	mkdir -p $(GPU_WHEELS)
	$(PYTHON) -m pip download $(PIP_FLAGS) --no-deps --only-binary=:all: --python-version $(GPU_WHEEL_PYTHON) \
	  --implementation cp $(foreach p,$(GPU_WHEEL_PLATFORMS),--platform $(p)) -d $(GPU_WHEELS) $(GPU_WHEEL_SPECS)
	ls -l $(GPU_WHEELS)
	total=$$(cat $(GPU_WHEELS)/*.whl | wc -c); echo "gpu-wheels: $$((total / 1048576)) MiB in $(GPU_WHEELS)"; \
	  test $$total -le $$(( $(GPU_CARRY_MIB) * 1048576 )) || { echo "gpu-wheels: more than $(GPU_CARRY_MIB) MiB"; exit 1; }

# ---- Packaging and the supported torch range -----------------------------------------------------
# wheel: dist/pddm_ext-*.whl built against the venv's torch (plain `pip wheel`: the build backend finds
# the venv's torch; CPU kernels; PDDM_EXT_CUDA as for pip).
#
# PIP_TOOLS: a --find-links directory with the build tools (setuptools, wheel, ninja), pip and build at
# their newest, and no torch: the installs below run with it alone (--no-index, no pip configuration),
# so a build that asked for torch would fail, and pip's log is checked for a torch besides.
PIP_TOOLS ?= build/pip-tools
PIP_TOOLS_SPECS ?= setuptools wheel ninja pip build
# pip with no configuration file, no index and no find-links but PIP_TOOLS (also for the pip that
# installs a build's requirements: it inherits the options).
NO_TORCH_PIP = env -u PIP_FIND_LINKS -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL -u PIP_CONSTRAINT \
  PIP_CONFIG_FILE=/dev/null PIP_NO_INDEX=1 PIP_FIND_LINKS='$(abspath $(PIP_TOOLS))'
# $(call no_torch_downloaded,LOG): pip's verbose output names no torch it collected, downloaded or processed.
no_torch_downloaded = ! grep -Ei '(collecting|downloading|processing|using cached) [^ ]*torch' $(1) \
  || { echo "$(1): pip fetched a torch"; exit 1; }

wheel: $(VENV)/.deps-stamp
	rm -rf dist
	PDDM_EXT_WERROR=$(WERROR) MAX_JOBS=$(JOBS) \
	  $(VENV)/bin/python -m pip wheel $(PIP_FLAGS) --no-deps -w dist .
	ls -l dist

$(PIP_TOOLS)/.stamp:
	mkdir -p $(PIP_TOOLS)
	$(PYTHON) -m pip download $(PIP_FLAGS) --only-binary=:all: -d $(PIP_TOOLS) $(PIP_TOOLS_SPECS)
	! ls $(PIP_TOOLS) | grep -i '^torch'
	touch $@

# pip-check: what a user does, in a fresh venv (no system site-packages) with the pip it brings:
# torch ($(TORCH_SPEC)) and numpy installed, then plain `pip install <path of this checkout>` run from
# outside it, with PIP_TOOLS alone; import and the smoke check (.ci/wheel_smoke.py: one op against the
# reference, opcheck, the build record) from outside the checkout. Then `python -m build` from the
# activated venv: the sdist, a wheel built from it (its own isolated environment; the backend finds
# the venv's torch through VIRTUAL_ENV), the sdist checked for every source and header
# (.ci/check_sdist.py), the wheel installed over the first install and checked the same way.
PIP_VENV ?= build/pip-venv

pip-check: $(PIP_TOOLS)/.stamp
	rm -rf $(PIP_VENV) dist
	$(PYTHON) -m venv $(PIP_VENV)
	$(PIP_VENV)/bin/python -m pip --version
	$(PIP_VENV)/bin/python -m pip install $(PIP_FLAGS) '$(TORCH_SPEC)' numpy
	cp .ci/wheel_smoke.py $(PIP_VENV)/
	cd $(PIP_VENV) && $(NO_TORCH_PIP) PDDM_EXT_WERROR=$(WERROR) MAX_JOBS=$(JOBS) \
	  bin/python -m pip install $(PIP_FLAGS) -v '$(CURDIR)' 2>&1 | tee pip-install.log
	$(call no_torch_downloaded,$(PIP_VENV)/pip-install.log)
	cd $(PIP_VENV) && bin/python wheel_smoke.py
	$(NO_TORCH_PIP) $(PIP_VENV)/bin/python -m pip install $(PIP_FLAGS) build
	VIRTUAL_ENV='$(abspath $(PIP_VENV))' PATH='$(abspath $(PIP_VENV))/bin':"$$PATH" $(NO_TORCH_PIP) \
	  PDDM_EXT_WERROR=$(WERROR) MAX_JOBS=$(JOBS) python -m build --outdir dist . 2>&1 | tee $(PIP_VENV)/build.log
	$(call no_torch_downloaded,$(PIP_VENV)/build.log)
	$(PIP_VENV)/bin/python .ci/check_sdist.py dist/pddm_ext-*.tar.gz
	$(NO_TORCH_PIP) $(PIP_VENV)/bin/python -m pip install $(PIP_FLAGS) --no-deps --force-reinstall dist/pddm_ext-*.whl
	cd $(PIP_VENV) && bin/python wheel_smoke.py

# oldest-torch: the smoke subset (tests/test_smoke.py) against the oldest torch pyproject.toml claims,
# in its own venv. PyPI has only CUDA builds of old torch for Linux (they run on the CPU but import
# only with their nvidia-* wheels: ~3 GB to download); the other packages: .ci/requirements-oldest.txt.
# The venv's pip is upgraded to the newest (PIP_TOOLS), then plain `pip install` of a copy of the tree
# (as cuda-build does) with PIP_TOOLS alone: the toolkit here (CUDA 13) does not match that torch's
# CUDA 12.1 and no GPU is visible, so the backend builds the CPU kernels and says so. The smoke tests
# run from outside the tree. Then that build, moved under the .venv's torch, must refuse to load with
# the one-paragraph ImportError (.ci/check_moved_build.py).
OLDEST_VENV ?= .venv-oldest
OLDEST_TORCH_SPEC ?= torch==2.4.1
OLDEST_REQUIREMENTS ?= .ci/requirements-oldest.txt
OLDEST_TREE := build/oldest-tree
MOVED_BUILD := build/moved-build

$(eval $(call venv_rules,$(OLDEST_VENV),$(OLDEST_TORCH_SPEC)))
$(OLDEST_VENV)/.deps-stamp: REQUIREMENTS = $(OLDEST_REQUIREMENTS)
$(OLDEST_VENV)/.deps-stamp: $(OLDEST_REQUIREMENTS)

oldest-torch: $(OLDEST_VENV)/.deps-stamp $(PIP_TOOLS)/.stamp $(VENV)/.deps-stamp
	$(call copy_tree,$(OLDEST_TREE))
	$(NO_TORCH_PIP) '$(abspath $(OLDEST_VENV))/bin/python' -m pip install $(PIP_FLAGS) --upgrade pip
	'$(abspath $(OLDEST_VENV))/bin/python' -m pip --version
	cd $(OLDEST_VENV) && $(NO_TORCH_PIP) PDDM_EXT_WERROR=$(WERROR) MAX_JOBS=$(JOBS) \
	  bin/python -m pip install $(PIP_FLAGS) -v '$(abspath $(OLDEST_TREE))' 2>&1 | tee pip-install.log
	$(call no_torch_downloaded,$(OLDEST_VENV)/pip-install.log)
	grep -o 'pddm-ext: building the CPU kernels only.*' $(OLDEST_VENV)/pip-install.log
	cd $(OLDEST_VENV) && bin/python -c 'import pddm_ext, torch; print("oldest-torch: torch", torch.__version__, "pddm_ext from", pddm_ext.__file__)'
	cd $(OLDEST_VENV) && bin/python -m pytest -q -ra -p no:cacheprovider '$(abspath $(OLDEST_TREE))/tests/test_smoke.py'
	rm -rf $(MOVED_BUILD)
	mkdir -p $(MOVED_BUILD)
	cp -r "$$($(OLDEST_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/pddm_ext" $(MOVED_BUILD)/
	cd $(MOVED_BUILD) && PYTHONPATH=. '$(abspath $(VENV))/bin/python' '$(abspath .ci/check_moved_build.py)'

# ---- Cleaning ------------------------------------------------------------------------------------
# cuda-clean: the CUDA venv and the CUDA build's tree and objects (what .ci/run frees after that step).
cuda-clean:
	@echo "cuda-clean: removing $$(du -sh $(CUDA_VENV) $(CUDA_TREE) $(CUDA_TEMP) 2>/dev/null | tr '\n' ' ')"
	rm -rf $(CUDA_VENV) $(CUDA_TREE) $(CUDA_TEMP)

clean:
	rm -rf build dist *.egg-info pddm_ext/_C*.so .pytest_cache .hypothesis
	rm -f $(VENV)/.package-stamp
	find . -name __pycache__ -type d -not -path './.venv*' -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) $(CUDA_VENV) $(OLDEST_VENV)

FORCE:
