# Switchyard — every setup step lives here so a fresh clone needs only `make run` / `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PORT   ?= 8000
ENGINES ?= 4
# The real vLLM engine lives in a cached venv outside the repository (3.5 GB; see docs/enginesim.md).
REAL_ENGINE_HOME ?= $(HOME)/.cache/switchyard/real-engine

.PHONY: run test services lint typecheck unit test-engine calibrate bench-engine bench-routing bench-real-routing bench-overhead bench-autoscale bench-lora bench-kvtier bench-profile clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# make run REDIS=1: also a private redis-server (installed when missing): shared state mode.
run: $(STAMP)
	$(if $(REDIS),bash scripts/services.sh,)
	$(VENV)/bin/switchyard up --port $(PORT) --engines $(ENGINES) $(if $(REDIS),--redis,)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check gateway routing kvcache autoscale enginesim

typecheck: $(STAMP)
	$(VENV)/bin/mypy

# Line-coverage floors per package, checked after the run (the data file .coverage is ignored;
# processes the tests start are measured too, see [tool.coverage.run] in pyproject.toml).
COV_FLOOR_ROUTING ?= 99
COV_FLOOR_KVCACHE ?= 99
COV_FLOOR_GATEWAY ?= 90
COV_FLOOR_AUTOSCALE ?= 95

services:
	bash scripts/services.sh

unit: $(STAMP) services
	rm -f .coverage .coverage.*
	$(PY) -m pytest -m "not real_engine" -p no:cacheprovider \
		--cov=routing --cov=kvcache --cov=gateway --cov=autoscale --cov-report=
	$(PY) -m coverage report --include='routing/*' --skip-covered -m --fail-under=$(COV_FLOOR_ROUTING)
	$(PY) -m coverage report --include='kvcache/*' --skip-covered -m --fail-under=$(COV_FLOOR_KVCACHE)
	$(PY) -m coverage report --include='gateway/*' --skip-covered -m --fail-under=$(COV_FLOOR_GATEWAY)
	$(PY) -m coverage report --include='autoscale/*' --skip-covered -m --fail-under=$(COV_FLOOR_AUTOSCALE)

test: lint typecheck unit

test-engine: $(STAMP) services  # services: redis-server for tests/real_kvtier
	REAL_ENGINE_HOME=$(REAL_ENGINE_HOME) bash scripts/real_engine_setup.sh
	REAL_ENGINE_HOME=$(REAL_ENGINE_HOME) $(PY) -m pytest -m real_engine -p no:cacheprovider

calibrate: $(STAMP)
	REAL_ENGINE_HOME=$(REAL_ENGINE_HOME) bash scripts/real_engine_setup.sh
	REAL_ENGINE_HOME=$(REAL_ENGINE_HOME) $(PY) -m benchmarks.engine.calibrate

bench-engine: $(STAMP)
	REAL_ENGINE_HOME=$(REAL_ENGINE_HOME) bash scripts/real_engine_setup.sh
	REAL_ENGINE_HOME=$(REAL_ENGINE_HOME) $(PY) -m benchmarks.engine.compare

bench-routing: $(STAMP)
	$(PY) -m benchmarks.routing

# Gateway overhead vs direct, nginx and the peer routers (issue 10; benchmarks/overhead/README.md).
# BENCH_ARGS passes options, e.g. make bench-overhead BENCH_ARGS=--quick
bench-overhead: $(STAMP)
	PY=$(PY) bash scripts/bench_tools.sh
	$(PY) -m benchmarks.overhead $(BENCH_ARGS)

# Autoscaling policies on the emulated cluster (issue 12; benchmarks/autoscale/README.md).
# BENCH_ARGS passes options, e.g. make bench-autoscale BENCH_ARGS=--quick
bench-autoscale: $(STAMP)
	$(PY) -m benchmarks.autoscale $(BENCH_ARGS)

# High-density LoRA: placement + LoRA-aware routing vs on-demand/static baselines, and the
# density (cost) search (issue 15; benchmarks/lora/README.md). BENCH_ARGS=--quick: < 15 min.
bench-lora: $(STAMP)
	$(PY) -m benchmarks.lora $(BENCH_ARGS)

# Shared KV tier over Redis: tier vs no tier x round-robin vs prefix-cache routing on simulated
# GPU engines, plus the store's GET/PUT throughput (issue 13; docs/kvtier.md). --quick: < 15 min.
bench-kvtier: $(STAMP) services
	$(PY) -m benchmarks.kvtier $(BENCH_ARGS)

# py-spy top-10 of the gateway at c=32 on zero-delay engines (PROFILE_ARGS=--before-rev REV)
bench-profile: $(STAMP)
	PY=$(PY) bash scripts/bench_tools.sh
	$(PY) -m benchmarks.overhead.profile $(PROFILE_ARGS)

# Prefix-cache vs round-robin routing through the gateway in front of two real vLLM CPU engines.
bench-real-routing: $(STAMP)
	REAL_ENGINE_HOME=$(REAL_ENGINE_HOME) bash scripts/real_engine_setup.sh
	REAL_ENGINE_HOME=$(REAL_ENGINE_HOME) $(PY) -m benchmarks.engine.real_routing

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache build *.egg-info .coverage .coverage.*
