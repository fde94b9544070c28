# Tandem: two commands on a fresh machine.
#   make serve   set up .venv (the serving install: no torch) and serve the shipped default model on 127.0.0.1:50051
#   make test    set up .venv-dev (serving + training + dev tools) and .venv, lint, run the whole suite
PYTHON   ?= python3
VENV     := .venv
DEV_VENV := .venv-dev
PIP_FLAGS := -q --disable-pip-version-check

.PHONY: serve test lint install install-dev proto default-model bench clean

# The serving install: onnxruntime, faiss, grpcio, tokenizers, Pillow, numpy (about 300 MB).
$(VENV)/.installed: pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install $(PIP_FLAGS) -e .
	@touch $@

# Everything: the serving install plus training (torch, open_clip, ...) and the test tools.
$(DEV_VENV)/.installed: pyproject.toml
	@test -x $(DEV_VENV)/bin/python || $(PYTHON) -m venv $(DEV_VENV)
	$(DEV_VENV)/bin/python -m pip install $(PIP_FLAGS) -e '.[train,dev]'
	@touch $@

install: $(VENV)/.installed
install-dev: $(DEV_VENV)/.installed

serve: $(VENV)/.installed
	$(VENV)/bin/tandem serve --models models

lint: $(DEV_VENV)/.installed
	$(DEV_VENV)/bin/ruff check .

# The suite runs in .venv-dev; tests/test_layout.py also starts the server from
# the serving install (.venv) to prove it works without torch.
test: $(DEV_VENV)/.installed $(VENV)/.installed lint
	TANDEM_SERVE_PYTHON=$(abspath $(VENV))/bin/python $(DEV_VENV)/bin/pytest -q -p no:cacheprovider

# Regenerate the committed gRPC stubs from proto/ (a test fails when they drift).
proto: $(DEV_VENV)/.installed
	$(DEV_VENV)/bin/python -m grpc_tools.protoc -Iproto --python_out=proto --grpc_python_out=proto --pyi_out=proto \
		proto/tandem/v1/tandem.proto

# Train the default model with our own trainer and export it to models/ (about 12 min on 2 cores).
default-model: $(DEV_VENV)/.installed
	$(DEV_VENV)/bin/python benchmarks/default_training.py --out runs/default
	$(DEV_VENV)/bin/tandem export --checkpoint runs/default/checkpoints/latest.pt --name tandem-shapes \
		--version 1 --force --note "make default-model: tandem train clip (procedural shapes)"
	cp runs/default/benchmark.json runs/default/curves.png docs/default-model/

bench: $(DEV_VENV)/.installed
	$(DEV_VENV)/bin/python benchmarks/embed_throughput.py

clean:
	rm -rf $(VENV) $(DEV_VENV) runs .pytest_cache
