# Two commands matter: `make serve` (the site on http://127.0.0.1:8000, or PORT=...) and `make test`.
# The tests run on two workers with one torch thread each: more threads than cores makes the
# small-op-heavy references (segment loops, chunked scans) many times slower.
# Both create .venv on first use and install everything the project needs into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export NO_MKDOCS_2_WARNING := 1
STAMP := $(VENV)/.installed

.PHONY: install serve test docs clean bench bench-decode bench-public peers quality

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# The CPU build of torch first, so that nothing pulls a multi-GB CUDA build.
	$(PY) -m pip install --disable-pip-version-check -q "torch==2.13.0"
	$(PY) -m pip install --disable-pip-version-check -q -e ".[test,docs,hf,ray,peers]"
	touch $(STAMP)

install: $(STAMP)

# PORT=8001 make serve for another port. The first build measures every entry's claims and draws
# its pictures (minutes; progress is printed); later builds reuse .cache/ and take seconds.
PORT ?= 8000
serve: $(STAMP)
	@echo "Building the site first (the first time: a few minutes, measuring 55+ entries)..."
	$(VENV)/bin/mkdocs serve --dev-addr 127.0.0.1:$(PORT)

docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict

test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -n 2

clean:
	rm -rf site .pytest_cache .ruff_cache .cache

# The committed benchmark results for this machine kind (2 cores, no GPU): every entry forward and
# forward + backward in the plain process, beside glibc tuned and, where ldconfig finds
# libjemalloc.so or libtcmalloc.so (Debian: apt-get install libjemalloc2), that allocator
# preloaded; FLOPs against the run's matmul rate. About 40 minutes on a quiet machine (55 entries).
bench: $(STAMP)
	$(VENV)/bin/zoo bench --n 1024 4096 16384 --repeats 5 --backward --allocators tuned preload \
		--out benchmarks/results.json

# Time per new token (layer.step) after contexts of 1k, 4k and 16k, every autoregressive entry
# beside SDPA with a KV cache; on a quiet machine, like `bench`.
bench-decode: $(STAMP)
	$(VENV)/bin/zoo bench --decode --n 1024 4096 16384 --repeats 5 --out benchmarks/decoding.json

# Side-by-side with public CPU implementations, forward and forward + backward, plain process:
# lucidrains' packages (not dependencies: installed into .cache/public) and the transformers
# implementations of the hf extra. On a quiet machine; about 15 minutes.
PUBLIC := performer-pytorch nystrom-attention linformer local-attention reformer-pytorch \
	sinkhorn-transformer routing-transformer axial-attention axial-positional-embedding \
	product-key-memory mixture-of-experts hyper-connections colt5-attention
bench-public: $(STAMP)
	$(PY) -m pip install -q --no-deps --target .cache/public $(PUBLIC)
	PYTHONPATH=.cache/public $(PY) benchmarks/compare_public.py --n 4096 16384 --out benchmarks/public.json

# Each entry beside the public implementation people use (the extra `peers`), weights copied, in
# float64: writes the sizes the "Compared with other implementations" pages print (seconds).
peers: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) benchmarks/peers.py --out benchmarks/peers.json

# The recall grid (associative recall, every entry x cell x learning rate): hours on 2 cores.
# Resumable: finished jobs are kept in the file, so stopping and re-running continues. JOBS=2 runs
# two jobs at a time; RAY=host:port hands them to a Ray cluster (the ray extra).
JOBS ?= 1
quality: $(STAMP)
	$(VENV)/bin/zoo quality --jobs $(JOBS) $(if $(RAY),--ray $(RAY)) --out benchmarks/quality.json
