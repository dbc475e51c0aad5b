# smlrec: two commands on a fresh machine: `make run` and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
# pip warns about every index folder of this machine's local mirrors; keep the log readable.
QUIET_PIP := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
OUT ?= runs/backtest-ml100k
export BENTOML_DO_NOT_TRACK := true
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: setup run serve bento image image-local screenshot backtest test reliability bench study soak audit lint fmt clean

setup: $(STAMP)

# torch comes first, pinned (the version read from pyproject.toml, the one place pins live):
# an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip $(QUIET_PIP)
	$(PY) -m pip install -q "$$(grep -oE 'torch==[0-9.]+' pyproject.toml | head -1)" $(QUIET_PIP)
	$(PY) -m pip install -q -e '.[stack,dev]' $(QUIET_PIP)
	$(PY) -c "import torch, smlrec; print('smlrec ready, torch', torch.__version__)"
	touch $@

## The main job: fetch MovieLens-100k (from the recbole wheel), bootstrap the challengers of
## configs/ml-100k.yaml (SML and the best other strategy, chosen on validation by `make bench`)
## on its first weeks, then run the daily Kubeflow pipeline locally for every later week.
run: setup
	$(VENV)/bin/smlrec data fetch
	$(VENV)/bin/smlrec pipeline demo --data-uri data/ml-100k --state-uri runs/state \
	  --config configs/ml-100k.yaml --out runs/report.html

## The prediction API on 127.0.0.1:3000 (docs at /docs), serving what `make run` packaged
## into runs/bentoml, with the Feast online store it filled. POST /feedback logs events under
## data/ml-100k/feedback/ (the next run's input). Override BENTOML_HOME, SMLREC_DATA_URI,
## SMLREC_MODEL_SOURCE (e.g. runs/state), SMLREC_CANARY_SHARE... (see serving/service.py).
SERVE_HOST ?= 127.0.0.1
SERVE_PORT ?= 3000
serve: setup
	BENTOML_HOME=$${BENTOML_HOME:-$(CURDIR)/runs/bentoml} \
	SMLREC_FEATURE_REPO=$${SMLREC_FEATURE_REPO:-$(CURDIR)/feature_repo} \
	SMLREC_FEATURE_DATA=$${SMLREC_FEATURE_DATA:-$(CURDIR)/runs/state/features} \
	SMLREC_DATA_URI=$${SMLREC_DATA_URI:-$(CURDIR)/data/ml-100k} \
	SMLREC_WORKERS=$${SMLREC_WORKERS:-auto} \
	$(VENV)/bin/bentoml serve serving.service:Recommender --host $(SERVE_HOST) --port $(SERVE_PORT)

## A Bento of the prediction API (offline: requirements from pyproject.toml, no locking).
bento: setup
	$(PY) -m serving.requirements build/requirements-serving.txt
	BENTOML_HOME=$${BENTOML_HOME:-$(CURDIR)/runs/bentoml} \
	$(VENV)/bin/bentoml build -f serving/bentofile.yaml .

## The pipeline image (Dockerfile) for a Kubeflow cluster, pushed to IMAGE's registry; compile
## the pipelines with the same SMLREC_IMAGE (`SMLREC_IMAGE=... smlrec pipeline compile`).
IMAGE ?= localhost:5000/smlrec:0.1.0
image:
	docker build -t $(IMAGE) .
	docker push $(IMAGE)

## The pipeline image without a Docker engine (as root: buildah on a Debian bookworm base made
## with mmdebstrap), with one pipeline step run from it offline; size and layers in
## benchmarks/results/image.md.
image-local:
	pipelines/build_image.sh localhost/smlrec:0.1.0

## docs/report.png: runs/report.html (written by `make run`) in headless Chromium (Debian's
## chromium package: `apt-get install chromium`).
CHROMIUM ?= chromium
screenshot:
	$(CHROMIUM) --headless --no-sandbox --disable-gpu --no-first-run --hide-scrollbars \
	  --disable-background-networking --disable-component-update --disable-sync \
	  --user-data-dir=$$(mktemp -d) --window-size=1400,2600 \
	  --screenshot=$(CURDIR)/docs/report.png file://$(CURDIR)/runs/report.html

## The SML backtest against the retraining baselines on MovieLens-100k.
backtest: setup
	$(VENV)/bin/smlrec data fetch
	$(VENV)/bin/smlrec backtest --dataset ml-100k --period-spec 7D --methods sml,full,finetune,window,pop --out $(OUT)

## The Optuna searches on validation periods behind the default grids (about an hour each on
## 2 cores): SML's transfer and training, and the sliding window's.
study: setup
	$(VENV)/bin/smlrec data fetch
	$(PY) -m benchmarks.sml_study --method sml --trials 40
	$(PY) -m benchmarks.sml_study --method window --trials 30

test: setup services
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q

## The servers tests/test_cluster.py starts (Debian's redis-server and PostgreSQL), installed
## from Debian's registry only when their programs are missing (as root, or through sudo).
SERVICE_PACKAGES := redis-server postgresql
.PHONY: services
services:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
	  || missing="$$missing postgresql"; \
	[ -z "$$missing" ] && exit 0; \
	sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); log=$$(mktemp); \
	echo "installing Debian packages:$$missing"; \
	install="$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
	  --no-install-recommends $$missing"; \
	if ! { $$install || { $$sudo apt-get update -q && $$install; }; } >$$log 2>&1; then \
	  tail -n 20 $$log; rm -f $$log; \
	  echo "make services: could not install$$missing with apt-get; install them by hand" \
	       "(apt-get install -y --no-install-recommends $(SERVICE_PACKAGES))" >&2; \
	  exit 1; \
	fi; rm -f $$log

## The test suite, recording its reliability counters (bad inputs stopped, faults survived,
## fuzz cases) in benchmarks/results/reliability.json; `make test` leaves the tree as it was.
reliability: setup
	SMLREC_RELIABILITY_JSON=$(CURDIR)/benchmarks/results/reliability.json $(VENV)/bin/pytest -q

## Benchmarks (figures saved under benchmarks/results/): the backtest (three seeds; it also
## rewrites configs/<dataset>.yaml from its validation choices), the cold-start track (adds
## the cold-start model chosen on validation to those files), the freshness replay (adds the
## per-event user update chosen on validation to configs/ml-100k.yaml), one daily run, serving,
## POST /feedback under load, the retraining cost curve over 100 periods (about 20 min).
bench: setup
	$(PY) -m benchmarks.backtest --no-progress
	$(PY) -m benchmarks.cold_start --no-progress
	$(PY) -m benchmarks.freshness --no-progress
	$(PY) -m benchmarks.daily_run
	$(PY) -m benchmarks.serving
	$(PY) -m benchmarks.feedback
	$(PY) -m benchmarks.cost_curve

## The API for 60 s at the highest load this machine sustains, with a hot swap half-way
## (benchmarks/results/soak.json and the load_* figures of reliability.json).
soak: setup
	$(PY) -m benchmarks.soak --duration 60

## Known vulnerabilities in the pinned dependencies (pip-audit). It needs the PyPI JSON API or
## OSV, which this project's offline CI cannot reach, so it is a separate target.
audit: setup
	$(PY) -m pip install -q -e '.[audit]' $(QUIET_PIP)
	$(VENV)/bin/pip-audit --strict --progress-spinner off

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

fmt: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
