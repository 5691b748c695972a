# fastpath-gateway — `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
STAMPS := .stamps
# The extension's sources (crates/bench is the separate fastpath-bench binary, built by its own stamp;
# tests/ and fuzz/ are not in the extension).
RUST_SRC := $(shell find crates/fastpath/src crates/fastpath/assets crates/fastpath/Cargo.toml -type f 2>/dev/null) Cargo.toml Cargo.lock
export PYO3_PYTHON := $(abspath $(PY))
export CARGO_TERM_COLOR := never

.PHONY: help triton-venv install build-dev build-release run serve test test-rust test-python test-rules test-deploy prometheus-deps observe lint fmt bench-deps bench bench-litellm bench-suite bench-aiperf bench-vs-aiperf clean

help: ## list targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(STAMPS)/venv: pyproject.toml
	@mkdir -p $(STAMPS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check uv "maturin>=1.8,<2"
	$(UV) pip install -q -p $(PY) -r pyproject.toml --extra dev
	touch $@

$(STAMPS)/build-release: $(STAMPS)/venv $(RUST_SRC) pyproject.toml
	VIRTUAL_ENV=$(abspath $(VENV)) PATH=$(abspath $(VENV))/bin:$$PATH $(VENV)/bin/maturin develop --release --uv -q
	rm -f $(STAMPS)/build-dev
	touch $@

# fastpath-bench links the fastpath core (without pyo3): its sources are the bench's too.
BENCH_SRC := $(shell find crates/bench crates/fastpath/src crates/fastpath/assets crates/fastpath/Cargo.toml -name '*.rs' -o -name 'Cargo.toml' -o -name '*.tiktoken' 2>/dev/null) Cargo.toml Cargo.lock

$(STAMPS)/bench: $(BENCH_SRC)
	@mkdir -p $(STAMPS)
	cargo build --release -q -p fastpath-bench
	touch $@

# The Triton venv: tritonserver from nvidia-pytriton and our models' imports, apart from the gateway's
# (its Python-backend stub needs numpy<2). --no-deps: the pins are the whole closure (no torch).
TRITON_VENV := .venv-triton
$(STAMPS)/triton-venv: triton_models/requirements.txt $(STAMPS)/venv
	test -x $(TRITON_VENV)/bin/python || $(PYTHON) -m venv $(TRITON_VENV)
	$(UV) pip install -q -p $(TRITON_VENV)/bin/python --no-deps -r triton_models/requirements.txt
	touch $@

triton-venv: $(STAMPS)/triton-venv ## the Triton venv (.venv-triton) with tritonserver and the models' deps

install: $(STAMPS)/build-release $(STAMPS)/bench $(STAMPS)/triton-venv ## create .venv, install deps, build the Rust extension and fastpath-bench (release)

build-release: $(STAMPS)/build-release ## (re)build the extension in release mode if sources changed

build-dev: $(STAMPS)/venv ## build the extension in debug mode (faster compile)
	VIRTUAL_ENV=$(abspath $(VENV)) PATH=$(abspath $(VENV))/bin:$$PATH $(VENV)/bin/maturin develop --uv -q
	rm -f $(STAMPS)/build-release

run: install ## install everything and run the gateway + its local upstream (Ctrl-C stops both)
	$(VENV)/bin/fastpath-gateway run-local

serve: install ## run only the gateway on the embedded default config
	$(VENV)/bin/fastpath-gateway serve

lint: $(STAMPS)/venv ## ruff, mypy, rustfmt, clippy
	$(VENV)/bin/ruff check python tests benchmarks deploy
	$(VENV)/bin/ruff format --check python tests benchmarks deploy
	$(VENV)/bin/mypy
	cargo fmt --all --check
	cargo clippy --workspace --all-targets --all-features -q -- -D warnings

fmt: $(STAMPS)/venv ## format Python and Rust
	$(VENV)/bin/ruff format python tests benchmarks deploy
	$(VENV)/bin/ruff check --fix python tests benchmarks deploy
	cargo fmt --all

test-rust: ## Rust unit tests (no venv: only the extension build enables pyo3)
	cargo test --workspace -q

# The HTTP/1.1 suites a second time on the other server engine (server.engine; ~40 s): every
# gateway those tests start runs on it (tests/python/conftest.py reads FASTPATH_TEST_ENGINE).
OTHER_ENGINE := $(shell $(PY) -c "from gateway.config import ServerConfig as S; print('granian' if S().engine == 'uvloop' else 'uvloop')" 2>/dev/null || echo granian)
ENGINE_SUITES := test_bad_input.py test_streaming.py test_lifecycle.py test_e2e_openai_sdk.py test_pipeline_contract.py test_server_timing.py
test-python: install ## Python tests (real sockets, real upstream processes), then the HTTP/1.1 suites on the other engine
	$(VENV)/bin/pytest -q -p no:cacheprovider
	FASTPATH_TEST_ENGINE=$(OTHER_ENGINE) $(VENV)/bin/pytest -q -p no:cacheprovider $(addprefix tests/python/,$(ENGINE_SUITES)) -k "not run_local"

# promtool and prometheus (Debian's `prometheus` package): the alert rules and the dashboard's
# queries are checked by promtool, and a test scrapes a gateway with a real Prometheus.
prometheus-deps: ## install promtool + prometheus (Debian package; idempotent)
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || \
	  (if [ "$$(id -u)" = 0 ]; then S=; else S="sudo -n"; fi; \
	   $$S apt-get update -q && $$S apt-get install -y -q --no-install-recommends prometheus)

test-rules: $(STAMPS)/build-release prometheus-deps ## promtool: check and unit-test the alert rules, check the dashboard's queries
	promtool check rules deploy/prometheus/alerts.yml
	cd deploy/prometheus && promtool test rules alerts_test.yml
	$(PY) deploy/check_dashboard.py deploy/grafana/fastpath-gateway.json

observe: install prometheus-deps ## the gateway + its local upstream, and a real Prometheus scraping it (:9090)
	$(VENV)/bin/fastpath-gateway run-local --prometheus

# The deployment artifacts, offline (no container engine or cluster here): the Kubernetes manifests
# against the Kubernetes JSON schemas (kubernetes-validate bundles them), hadolint on the Dockerfile,
# yamllint, and tests/deploy (the pieces agree with each other and load with the gateway's config
# loader). The validators live in their own venv (.venv-deploy), pinned in deploy/requirements.txt.
DEPLOY_VENV := .venv-deploy
K8S_VERSION := 1.31.0
$(STAMPS)/deploy-venv: deploy/requirements.txt $(STAMPS)/venv
	test -x $(DEPLOY_VENV)/bin/python || $(PYTHON) -m venv $(DEPLOY_VENV)
	$(UV) pip install -q -p $(DEPLOY_VENV)/bin/python -r deploy/requirements.txt
	touch $@

test-deploy: $(STAMPS)/build-release $(STAMPS)/deploy-venv ## validate Dockerfile, compose file and Kubernetes manifests offline
	$(DEPLOY_VENV)/bin/yamllint -s -c deploy/.yamllint.yaml deploy/k8s deploy/compose
	$(DEPLOY_VENV)/bin/kubernetes-validate --strict --quiet -k $(K8S_VERSION) \
	  $$(grep -E '^  - .+\.yaml$$' deploy/k8s/kustomization.yaml | sed 's|^  - |deploy/k8s/|')
	$(DEPLOY_VENV)/bin/hadolint --no-color Dockerfile
	$(VENV)/bin/pytest -q -p no:cacheprovider tests/deploy

test: lint test-rust test-rules test-deploy test-python ## everything CI runs: lint, Rust, rules, deployment and Python tests

bench-deps: ## system tools for benchmarks (wrk, nginx + its stream module, redis-server); not needed for tests
	@command -v wrk >/dev/null && command -v nginx >/dev/null && command -v redis-server >/dev/null && \
	  test -e /usr/lib/nginx/modules/ngx_stream_module.so || \
	  (sudo -n true 2>/dev/null && S=sudo || S=; $$S apt-get update -q && \
	   ($$S apt-get install -y -q wrk nginx-light libnginx-mod-stream redis-server || \
	    $$S apt-get install -y -q wrk nginx libnginx-mod-stream redis-server))

bench: install bench-deps ## first measurement: direct vs through the gateway (wrk)
	$(PY) benchmarks/proxy_overhead.py

# A pinned benchmark baseline in its own venv (never imported by the gateway or its tests).
# $(call pinned_venv,VENV,REQUIREMENT)
define pinned_venv
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(UV) pip install -q -p $(1)/bin/python '$(2)'
	touch $@
endef

# The LiteLLM proxy baseline.
LITELLM_VERSION := 1.106.2
LITELLM_VENV := .venv-litellm
$(STAMPS)/litellm-venv: Makefile $(STAMPS)/venv
	$(call pinned_venv,$(LITELLM_VENV),litellm[proxy]==$(LITELLM_VERSION))

bench-litellm: $(STAMPS)/litellm-venv ## the LiteLLM proxy baseline (.venv-litellm, pinned litellm[proxy])

# aiperf (NVIDIA's benchmark client): the reference `fastpath-bench` is measured against.
AIPERF_VERSION := 0.13.0
AIPERF_VENV := .venv-aiperf
$(STAMPS)/aiperf-venv: Makefile $(STAMPS)/venv
	$(call pinned_venv,$(AIPERF_VENV),aiperf==$(AIPERF_VERSION))

bench-aiperf: $(STAMPS)/aiperf-venv ## the aiperf baseline (.venv-aiperf, pinned aiperf)

bench-vs-aiperf: install bench-deps bench-aiperf ## fastpath-bench vs aiperf: accuracy on a paced upstream, capacity on an instant one
	$(PY) benchmarks/bench_vs_aiperf.py

bench-suite: install bench-deps bench-litellm ## the comparative suite (all scenarios and baselines; QUICK=1 for ~3 min)
	$(PY) benchmarks/suite.py $(if $(QUICK),--quick)

clean: ## remove build outputs and the venv
	rm -rf $(VENV) $(TRITON_VENV) $(STAMPS) target
