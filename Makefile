# make demo: the whole story on this machine.  make test: the test suite.  make bench: the agent inference benchmark
# (BENCH_ARGS=--quick for a one-minute smoke run).  All set up .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# torch 2.13.0 has a CPU wheel; a plain "torch" may pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
export ORT_DISABLE_TELEMETRY=1 OLIVE_DISABLE_TELEMETRY=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

.PHONY: demo test venv clean bench bench-rollout results

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[agent,fleet,trainer,dev]"
	touch $@

demo: venv
	$(VENV)/bin/slmops demo

test: venv
	$(PY) -m pytest -q

bench: venv
	$(PY) -m bench.agent $(BENCH_ARGS)

# rollout to simulated devices through a real fleet and broker (ROLLOUT_ARGS="--devices 1000 --broker embedded")
bench-rollout: venv
	$(PY) -m bench.rollout $(ROLLOUT_ARGS)

clean:
	rm -rf $(VENV) .cache demo-out .pytest_cache

# docs/results.md: the reference teacher, the distilled student and a LoRA fine-tune, built by recipes/reference/
# and measured side by side (about 30 minutes on 2 cores the first time; finished steps are reused)
results: venv
	$(PY) -m bench.results $(RESULTS_ARGS)
