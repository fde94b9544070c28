# Tandem: two commands on a fresh machine.
#   make serve   set up .venv and serve the shipped default model on 127.0.0.1:50051
#   make test    set up .venv with dev tools and run the whole suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip -q --disable-pip-version-check
STAMP  := $(VENV)/.installed

.PHONY: serve test install proto default-model bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel
	$(PIP) install -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/tandem serve --models models

test: $(STAMP)
	$(VENV)/bin/pytest -q -p no:cacheprovider

# Regenerate the committed gRPC stubs from proto/ (a test fails when they drift).
proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iproto --python_out=proto --grpc_python_out=proto --pyi_out=proto \
		proto/tandem/v1/tandem.proto

# Train the default model with our own trainer and export it to models/ (about 12 min on 2 cores).
default-model: $(STAMP)
	$(PY) benchmarks/default_training.py --out runs/default
	$(VENV)/bin/tandem export --checkpoint runs/default/checkpoints/latest.pt --name tandem-shapes \
		--version 1 --force --note "make default-model: tandem train clip (procedural shapes)"
	cp runs/default/benchmark.json runs/default/curves.png docs/default-model/

bench: $(STAMP)
	$(PY) benchmarks/embed_throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache
