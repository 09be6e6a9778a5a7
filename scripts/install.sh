#!/usr/bin/env bash
# Creates .venv (if missing) with torch, torchvision, this package and detectron2.
# detectron2: upstream from GitHub first; offline fallback is the PyPI wheel
# `sal-detectron2==0.7.2` (upstream 0.7.2 Python source, cp310 tag) unpacked into
# .venv/detectron2-src and put on the path with a .pth file. Its compiled ops are not
# needed: focalnet-pl only uses pure-PyTorch / torchvision paths.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS:-test}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[install] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check -q)

if ! "$PY" -c "import torch, torchvision" 2>/dev/null; then
  echo "[install] torch 2.14.1 + torchvision 0.29.1"
  "${PIP[@]}" "torch==2.14.1" "torchvision==0.29.1"
fi

echo "[install] focalnet-pl (editable) and its dependencies"
"${PIP[@]}" -e ".[${EXTRAS}]"

if ! "$PY" -c "import detectron2.modeling" 2>/dev/null; then
  echo "[install] detectron2: trying upstream"
  if ! timeout 900 "${PIP[@]}" --no-build-isolation \
      'git+https://github.com/facebookresearch/detectron2.git' 2>/dev/null; then
    echo "[install] upstream unavailable; using the sal-detectron2==0.7.2 source wheel"
    target="$VENV/detectron2-src"
    rm -rf "$target"
    "${PIP[@]}" --no-deps --python-version 3.10 --only-binary=:all: \
      --target "$target" "sal-detectron2==0.7.2"
    site=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    (cd "$target" && pwd) > "$site/detectron2-src.pth"
  fi
fi
"$PY" -c "import detectron2, torch; print('[install] ready: torch', torch.__version__, '| detectron2', detectron2.__version__)"
