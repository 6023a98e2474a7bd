# The two front-door commands: `make demo` and `make test` (see README). Both create .venv on
# first use and install the project with the pinned versions in constraints.txt, and DVC as a
# tool in its own environment .venv-dvc (constraints-dvc.txt), linked as .venv/bin/dvc: DVC's
# hydra-core pins antlr4 4.9, Dagster's asset-selection grammar needs 4.13.
PYTHON ?= python3
VENV := .venv
DVC_VENV := .venv-dvc
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DVC_STAMP := $(DVC_VENV)/.installed

# No test and no demo step may reach the network: models are built locally, W&B runs offline.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export WANDB_MODE ?= offline
export WANDB_SILENT := true
export DVC_NO_ANALYTICS := 1
export DAGSTER_HOME ?= $(CURDIR)/.dagster_home

.PHONY: demo test bench install clean

install: $(STAMP) $(DVC_STAMP)

# The k8s extra (dagster-k8s) is what the tests validate deploy/dagster/ with; the docs extra
# (mkdocs) is what they build the documentation site with; the ray extra runs the two-node Ray
# generation tests.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test,k8s,docs,ray]"
	@touch $(STAMP)

$(DVC_STAMP): constraints-dvc.txt $(STAMP)
	@test -x $(DVC_VENV)/bin/python || $(PYTHON) -m venv $(DVC_VENV)
	$(DVC_VENV)/bin/python -m pip install --quiet -c constraints-dvc.txt dvc
	ln -sfn ../../$(DVC_VENV)/bin/dvc $(BIN)/dvc
	@touch $(DVC_STAMP)

demo: install
	$(BIN)/python -m orchestration.demo

test: install
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf data/ .dagster_home/ wandb/ benchmarks/results/latest.json
