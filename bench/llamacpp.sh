#!/usr/bin/env bash
# llama.cpp on the same random 2B weights, for BENCHMARKS.md (not part of the project or CI).
# Builds llama.cpp from the llama-cpp-python source distribution (which vendors it) in $WORK,
# converts the random-weight checkpoint that `python -m qwen3vl.bench --arch 2B` wrote, and
# runs llama-bench with 2 threads: prompt of 256 tokens, then 32 generated tokens at depth 256.
set -euo pipefail
WORK=${WORK:-/tmp/llama}
CKPT=${CKPT:-${QWEN3VL_HOME:-$HOME/.cache/qwen3vl}/bench-2B-bfloat16}
DEMO=${DEMO:-${QWEN3VL_HOME:-$HOME/.cache/qwen3vl}/demo-tiny-v1}   # for the tokenizer files
mkdir -p "$WORK" && cd "$WORK"
[ -f llama_cpp_python-*.tar.gz ] || pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d .
[ -d llama_cpp_python-0.3.36 ] || tar xzf llama_cpp_python-0.3.36.tar.gz
L=$WORK/llama_cpp_python-0.3.36/vendor/llama.cpp
if [ ! -x "$L/build/bin/llama-bench" ]; then
  cmake -S "$L" -B "$L/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DGGML_NATIVE=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF
  cmake --build "$L/build" -j2 --target llama-bench llama-quantize
fi
mkdir -p 2b && for f in "$CKPT"/*; do ln -sf "$f" 2b/; done
for f in tokenizer.json tokenizer_config.json chat_template.jinja; do cp "$DEMO/$f" 2b/; done
[ -f model-bf16.gguf ] || python "$L/convert_hf_to_gguf.py" 2b --outtype bf16 --outfile model-bf16.gguf
for q in Q8_0 Q4_0; do [ -f model-$q.gguf ] || "$L/build/bin/llama-quantize" model-bf16.gguf model-$q.gguf $q 2; done
for m in bf16 Q8_0 Q4_0; do
  "$L/build/bin/llama-bench" -m model-$m.gguf -t 2 -p 256 -n 32 -d 256 -r 3 -o md
done
