# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the whole suite).
# Each installs what it needs first; a second run reuses the installed environment.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= ../shared/data/chest_xray_224
export JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION := 20
export AWS_EC2_METADATA_DISABLED := true
export SAGEMAKER_TELEMETRY_OPT_OUT := true

.PHONY: install demo test bench lint clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[train,serve,infra,dev]'
	touch $@

node_modules/.installed: package.json
	@if [ -f package-lock.json ]; then npm ci --no-audit --no-fund --loglevel=error; else npm install --no-audit --no-fund --loglevel=error; fi
	touch $@

install: $(VENV)/.installed $(if $(wildcard package.json),node_modules/.installed)

# The main job: the local twin of the whole serverless flow on 127.0.0.1 (S3 server, trigger,
# training under the SageMaker contract, gate, registry, promotion, the API and its page).
# ONCE=1 stops everything after the first prediction; FULL=1 trains the full CPU recipe.
demo: install
	$(PY) -m infra.twin --data $(DATA) $(if $(filter 1,$(ONCE)),--once) $(if $(filter 1,$(FULL)),--full)

# pytest exits 5 when it collected nothing: for this suite that is a failure, not a pass.
test: install
	@$(PY) -m pytest $(PYTEST_ARGS); status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$status

bench: install
	$(PY) benchmarks/train_input_benchmark.py
	$(PY) benchmarks/serving_benchmark.py --bundle models/reference/model.tar.gz
	$(PY) benchmarks/load_test.py

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs cdk.out .pytest_cache .twin build
