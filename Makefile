# Two commands on a fresh machine: `make demo` and `make test` (README quick start).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.featcache-installed

.PHONY: install demo test bench clean

install: $(STAMP)

# torch is pinned to the CPU build first; the project's own range (torch>=2.1) then installs nothing more.
$(STAMP): setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,dicom,faiss]"
	touch $(STAMP)

demo: install
	$(PY) examples/quickstart.py --out demo_out

test: install
	$(PY) -m pytest -q -p no:cacheprovider

bench: install
	$(PY) benchmarks/extract.py
	$(PY) benchmarks/knn.py
	$(PY) benchmarks/probe.py
	$(PY) benchmarks/sweep.py

clean:
	rm -rf $(VENV) demo_out build *.egg-info
