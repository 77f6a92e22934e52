# Set-up and test commands. `make demo` and `make test` create .venv with the pinned torch stack first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# timm imports torchvision; this pair installs from the local wheel cache and runs on the CPU.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
PINS := timm==1.0.31 onnx==1.23.2 onnxruntime==1.32.0 onnxscript==0.7.2 safetensors==0.8.0 openvino==2026.4.1 \
	tract==0.23.9
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

# Real data for the demo and the fine-tuning tests: Fashion-MNIST from Debian's dataset-fashion-mnist package
DATA_DIR := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup data demo test test-slow test-gpu gpu-check gpu-check-dry bench bench-records bench-gpu docs docs-serve clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_PINS)
	# torch is named again so that no dependency can swap it for another build
	$(PY) -m pip install --quiet $(TORCH_PINS) $(PINS) -e '.[test,demo]'
	touch $(STAMP)

setup: $(STAMP)

data:
	@test -d $(DATA_DIR) || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends dataset-fashion-mnist; }

demo: setup data
	$(PY) -m dpp_surgery.demo

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: setup
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

# on a machine with a CUDA device: the Triton kernels compiled for it (the default run tests them in Triton's
# interpreter), and their benchmarks
test-gpu: setup
	$(PY) -m pytest -q -m gpu $(PYTEST_ARGS)

bench: setup
	$(PY) -m dpp_surgery.bench layer

# the records behind the speed pages (docs/results/speed.md, method.md, placement.md, internals/gpu.md), one
# benchmark at a time on an otherwise idle machine (about 40 minutes on 2 cores), then the pages regenerated
BENCH_RECORD = $(PY) -m dpp_surgery.bench --record results/bench/$(1).json --overwrite
bench-records: setup
	$(call BENCH_RECORD,init) init
	$(call BENCH_RECORD,preserve) preserve
	$(call BENCH_RECORD,layer) layer --dtypes float32 bfloat16 --compile
	$(call BENCH_RECORD,onnx_layer) onnx-layer
	$(call BENCH_RECORD,onnx) onnx
	$(call BENCH_RECORD,runtimes) runtimes
	$(call BENCH_RECORD,train) train --amp-dtype auto bfloat16
	$(call BENCH_RECORD,triton_report) triton-report --full --jobs 2
	$(PY) -m dpp_surgery.tools.docs_results

# on a GPU machine that already has torch and Triton (no setup, no .venv): parity, torch.compile, autocast,
# determinism, short benchmarks and the Triton register report, in one script: make gpu-check PYTHON=python3
gpu-check:
	$(PYTHON) -m dpp_surgery.tools.gpu_check --output gpu_check_out

# the same script on a CPU, through Triton's interpreter at tiny sizes (tests/test_gpu_check.py runs it too)
gpu-check-dry:
	$(PYTHON) -m dpp_surgery.tools.gpu_check --dry --output gpu_check_out

bench-gpu: setup
	$(PY) -m dpp_surgery.bench layer --device cuda
	$(PY) -m dpp_surgery.bench train --device cuda --models resnet50 efficientnet_lite0 --img-size 224 -b 64 \
		--amp-dtype bfloat16 --channels-last

# the documentation site (mkdocs.yml) into site/; --strict turns a broken link, reference or missing page into an error
docs: setup
	DISABLE_MKDOCS_2_WARNING=true NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict -d site

docs-serve: setup
	DISABLE_MKDOCS_2_WARNING=true NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs serve

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis site
