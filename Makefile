# Everything sets itself up: the first target that needs Python creates .venv and installs into it.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO := demo-out

help: ## this list
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 16

.PHONY: help install test test-install chromium lint demo harden bench-ingest bench-train bench-robust bench-attack s3-start s3-stop \
	clean cluster-demo

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, exactly pinned: the CPU build here, the CUDA build on GPU machines
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# the exact attack's compiled CPU search, cached next to its source (about 25 s, once)
	$(PY) -m attacks.methods.exact
	$(PY) -m attacks.methods.exact_l2
	touch $@

install: $(STAMP) ## create .venv and install the project

test: $(STAMP) chromium ## run the test suite (local Ray, a real local S3 server)
	$(PY) -m pytest -q

# A fresh venv, a plain `pip install .` of the checkout, every job from outside it (2 minutes).
test-install: $(STAMP) ## the plain-install test: a fresh venv, pip install ., every job
	FOOLING_INSTALL_TEST=1 $(PY) -m pytest -q tests/test_install.py

# The report's test opens the page in Debian's headless Chromium; installed here when missing.
chromium: ## install Debian's Chromium for the report's browser test, when missing
	@command -v chromium >/dev/null || (apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
		echo "chromium could not be installed: the report's browser test will be skipped"

lint: $(STAMP) ## ruff
	$(VENV)/bin/ruff check .

# The main job end to end on built-in sample, local Ray, output under demo-out/: the photographs,
# the model and every fooling image; the blog's 99% fooling images (the same model pushed on, on
# the first 30 images); the regularization trade-off (three strengths, each model attacked on 30
# images); the summary and the report of all of it.
demo: $(STAMP) ## every job and the report on the built-in sample, into demo-out/
	$(PY) -m pipelines.sample --output $(DEMO)/sample
	$(PY) -m pipelines.ingest --source $(DEMO)/sample --output $(DEMO)/imagenet64 --overwrite
	$(PY) -m pipelines.preview --data $(DEMO)/imagenet64 --preview $(DEMO)/preview.png
	$(PY) -m training.train --data $(DEMO)/imagenet64 --output $(DEMO)/model --overwrite
	$(PY) -m attacks.fool --data $(DEMO)/imagenet64 --model $(DEMO)/model \
		--output $(DEMO)/fooling --noise-images 4 --overwrite
	$(PY) -m attacks.fool --data $(DEMO)/imagenet64 --model $(DEMO)/model \
		--output $(DEMO)/confident --methods iterative --confidence 0.99 --limit-images 30 --overwrite
	$(PY) -m training.sweep --data $(DEMO)/imagenet64 --output $(DEMO)/sweep --reg 0.1,10,100 \
		--epochs 5 --overwrite
	$(PY) -m attacks.frontier --sweeps $(DEMO)/sweep --output $(DEMO)/frontier --limit-images 30 \
		--overwrite
	$(PY) -m attacks.summary --results $(DEMO)/fooling
	$(PY) -m report --results $(DEMO)/fooling --sweep $(DEMO)/sweep --frontier $(DEMO)/frontier \
		--confident $(DEMO)/confident --output $(DEMO)/report --overwrite

# The blog's last claim measured on the photo sample (docs/train.md, "Background class and
# adversarial retraining"): three rounds of each mode, the L2 and robust sweeps, one frontier.
HARDEN := $(DEMO)/harden-photos
harden: $(STAMP) ## background class and adversarial retraining against L2 and robust, one frontier
	$(PY) -m pipelines.sample --output $(HARDEN)/sample
	$(PY) -m pipelines.ingest --source $(HARDEN)/sample --output $(HARDEN)/imagenet64 --overwrite
	$(PY) -m training.harden --data $(HARDEN)/imagenet64 --output $(HARDEN)/harden --overwrite
	$(PY) -m training.sweep --data $(HARDEN)/imagenet64 --output $(HARDEN)/sweep-l2 \
		--reg 0.1,10,100 --overwrite
	$(PY) -m training.sweep --data $(HARDEN)/imagenet64 --output $(HARDEN)/sweep-robust \
		--reg 0.1 --robust-eps 2,8,16 --overwrite
	$(PY) -m attacks.frontier --sweeps $(HARDEN)/sweep-l2,$(HARDEN)/sweep-robust \
		--harden $(HARDEN)/harden --output $(HARDEN)/frontier --limit-images 100 --overwrite

bench-ingest: $(STAMP) ## ingest benchmark: the job against Ray's stock reader
	$(PY) -m benchmarks.ingest --images 10000 --repeat 2

bench-train: $(STAMP) ## training benchmark: the job against a plain PyTorch loop
	$(PY) -m benchmarks.train

bench-robust: $(STAMP) ## robust training against L2 on real photos: the frontier's numbers
	$(PY) -m benchmarks.robust

# torchattacks' own metadata asks for another torch: installed without its dependencies
bench-attack: $(STAMP) ## attack benchmark: the methods against torchattacks
	$(PY) -m pip install -q --no-deps torchattacks==3.5.1
	$(PY) -m benchmarks.attack

# A local S3 server (SeaweedFS) for trying the s3:// paths by hand: eval "$$(make -s s3-start)"
s3-start: $(STAMP) ## a local S3 server for trying s3:// by hand
	@$(PY) infra/local_s3.py start --bucket demo-bucket

s3-stop: $(STAMP) ## stop it
	@$(PY) infra/local_s3.py stop

clean: ## remove demo-out/ and pytest's cache
	rm -rf $(DEMO) .pytest_cache

# The three jobs submitted with `ray job submit` to a local two-node Ray cluster, all data on a
# local S3 server; checks the outputs and stops everything it started.
cluster-demo: $(STAMP) ## the jobs via ray job submit on a local two-node cluster and S3
	$(PY) -m infra.cluster_demo
