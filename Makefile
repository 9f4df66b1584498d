# `make demo`: set up .venv, then train on the built-in demo data, export (fp16) and score.
# `make test`: set up .venv and .venv-serve, then run the whole test suite.
# `make serve-env`: .venv-serve, the serving environment (`mp4sr-rt serve`: nvidia-pytriton pins
# numpy<2, so it lives apart from the training environment; no torch in it).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SERVE_VENV := .venv-serve
SERVE_STAMP := $(SERVE_VENV)/.installed

.PHONY: demo test lint bench clean serve-env

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e ".[train,cpu,dev,ann]"
	touch $(STAMP)

$(SERVE_STAMP): pyproject.toml
	test -x $(SERVE_VENV)/bin/python || $(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/python -m pip install -q -e ".[serve,cpu,ann]"
	touch $(SERVE_STAMP)

serve-env: $(SERVE_STAMP)

demo: $(STAMP)
	$(BIN)/mp4sr-rt train --resume
	$(BIN)/mp4sr-rt export --fp16
	$(BIN)/mp4sr-rt score examples/history.json

test: $(STAMP) $(SERVE_STAMP)
	@# onnxruntime C headers for the C++ example's test; MP4SR_REQUIRE_CPP=1 (CI) makes a failed fetch fatal
	bash examples/cpp/fetch_ort_headers.sh || [ "$${MP4SR_REQUIRE_CPP:-0}" != 1 ]
	@# FAISS's C++ library for the approximate-index example (examples/cpp/ann_search.cc), likewise
	bash examples/cpp/fetch_faiss.sh || [ "$${MP4SR_REQUIRE_CPP:-0}" != 1 ]
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python benchmarks/train_throughput.py

clean:
	rm -rf mp4sr-out
