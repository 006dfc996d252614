# Everything sets itself up: the first target that needs Python creates .venv and installs into it.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO := demo-out

.PHONY: install test lint demo bench-ingest s3-start s3-stop clean cluster-demo

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, exactly pinned: the CPU build here, the CUDA build on GPU machines
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# The main job end to end on built-in sample data, local Ray, output under demo-out/.
demo: $(STAMP)
	$(PY) -m pipelines.sample --out $(DEMO)/sample
	$(PY) -m pipelines.ingest --source $(DEMO)/sample --output $(DEMO)/imagenet64 --overwrite
	$(PY) -m pipelines.summary --data $(DEMO)/imagenet64

bench-ingest: $(STAMP)
	$(PY) -m benchmarks.ingest --per-class 1000

# A local S3 server (SeaweedFS) for trying the s3:// paths by hand: eval "$$(make -s s3-start)"
s3-start: $(STAMP)
	@$(PY) infra/local_s3.py start --bucket demo-bucket

s3-stop: $(STAMP)
	@$(PY) infra/local_s3.py stop

clean:
	rm -rf $(DEMO) .pytest_cache

# The three jobs submitted with `ray job submit` to a local two-node Ray cluster, all data on a
# local S3 server; checks the outputs and stops everything it started.
cluster-demo: $(STAMP)
	$(PY) -m infra.cluster_demo
