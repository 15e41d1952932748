# Two entry points for a fresh machine: `make test` and `make demo`. Both create .venv and install into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: dicom3tools orthanc setup lint test test-fast test-isa demo ablate transfer bench bundles gpu-wheels

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	$(BIN)/pip install --quiet --no-deps monailabel==0.8.5
	touch $(STAMP)

setup: $(STAMP)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports  # the layer contract of pyproject.toml (docs/ARCHITECTURE.md)

# dciodvfy (Debian's dicom3tools), the DICOM validator tests/test_dicom_seg.py runs on the written SEG: installed
# with apt-get when missing and run as root (CI); elsewhere that test skips (fails under CI=true)
dicom3tools:
	@command -v dciodvfy >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dicom3tools >/dev/null); } || \
		echo "dciodvfy missing (apt-get install dicom3tools as root): tests/test_dicom_seg.py skips its validation"

# Orthanc with its DICOMweb and GDCM (JPEG 2000 transcoding) plugins, the PACS tests/test_label_server.py starts on
# a loopback port: installed with apt-get when missing and run as root (CI); elsewhere those tests skip (fail under
# CI=true)
orthanc:
	@{ command -v Orthanc >/dev/null && [ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] && \
		[ -f /usr/share/orthanc/plugins/libOrthancGdcm.so ]; } || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq orthanc orthanc-dicomweb orthanc-gdcm \
		>/dev/null); } || \
		echo "Orthanc missing (apt-get install orthanc orthanc-dicomweb orthanc-gdcm as root): tests/test_label_server.py skips"

# pytest-xdist: 2 workers (the tests' networks run on one thread each); each worker builds the session fixtures
test: lint dicom3tools orthanc
	$(BIN)/pytest -n 2
	$(MAKE) test-isa

# the inner loop: lint and the unit tier, without the integration tests (bundle runs, torchrun, CLI processes,
# training; the marker in pyproject.toml); `make test` runs them all
test-fast: lint
	$(BIN)/pytest -q -n 2 -m "not integration"

# the exactness tests (two computation paths of the same numbers) again with the kernels of other instruction sets
# (oneDNN's convolutions) and on 2 threads: an equality that holds on one CPU only fails here
test-isa: setup
	ONEDNN_MAX_CPU_ISA=AVX2 $(BIN)/pytest -q -m exactness
	ONEDNN_MAX_CPU_ISA=SSE41 UNISEG_TEST_THREADS=2 $(BIN)/pytest -q -m exactness

bench: setup
	$(BIN)/python benchmarks/network_speed.py
	$(BIN)/python benchmarks/trainer_overhead.py
	$(BIN)/python benchmarks/data_speed.py

# the pure-Python wheels benchmarks/gpu_check.sh installs on a GPU machine without internet (Python 3.12, torch there)
gpu-wheels:
	$(PYTHON) -m pip download --quiet --only-binary=:all: --no-deps --python-version 3.12 -d benchmarks/wheels \
		monai==1.6.1 nibabel==5.4.2 pytorch-ignite==0.5.5 fire==0.7.1 termcolor==3.3.0 tqdm==4.70.1
	du -sh benchmarks/wheels

demo: setup
	test -f demo_output/data/datalist.json || $(BIN)/uniseg generate-phantoms --out demo_output/data
	$(BIN)/uniseg check-data demo_output/data/datalist.json
	$(BIN)/uniseg demo --out demo_output --bundle bundles/uniseg_pretrain

# the six default variants x 3 seeds at the demo's budget, one run per core at a time (README, "uniseg ablate");
# other options through ABLATE, e.g. make ablate ABLATE="--seeds 1 --variants uniseg,task_blind"
ABLATE ?=
ablate: setup
	$(BIN)/uniseg ablate --out ablation_output $(ABLATE)

# fine-tuning from scratch vs from the demo's pretraining (trained once into transfer_output/pretrained), 3 seeds at
# the demo's fine-tuning budget (README, "Transfer learning"); other options through TRANSFER, e.g.
# make transfer TRANSFER="--seeds 1 --pretrained demo_output/pretrain/models/model.pt"
TRANSFER ?=
transfer: setup
	$(BIN)/uniseg transfer --out transfer_output $(TRANSFER)

bundles: setup
	$(BIN)/uniseg pack-bundles --out dist
