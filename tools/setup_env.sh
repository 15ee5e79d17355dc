#!/usr/bin/env bash
# One set-up path for every README command: creates (or reuses) .venv in the repository root with the pinned
# development environment and this package installed in editable mode.
#
#   bash tools/setup_env.sh          # core: torch, timm, ... and spatial_mamba
#   bash tools/setup_env.sh --mm     # core + mmcv 2.1.0 (built once per machine, cached) + mmdet/mmseg/mmpretrain
#   bash tools/setup_env.sh --floor  # also the oldest supported environment (requirements-floor.txt: Python 3.10,
#                                    # torch 2.1.2), for the compatibility leg of tools/run_tests.sh
#
# The mmcv wheel is cached in $SPATIAL_MAMBA_CACHE (default ~/.cache/spatial_mamba), keyed by the mmcv, torch and
# Python versions, so only the first run on a machine pays the ~7 minute build. The floor environment is cached there
# too (venvs/), keyed by requirements-floor.txt; its path is written to .venv/floor-python. It needs a Python 3.10
# interpreter: $FLOOR_PYTHON, python3.10 on PATH, or pyenv's.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
CACHE="${SPATIAL_MAMBA_CACHE:-$HOME/.cache/spatial_mamba}"
WITH_MM=0
WITH_FLOOR=0
for arg in "$@"; do
  case "$arg" in
    --mm) WITH_MM=1 ;;
    --floor) WITH_FLOOR=1 ;;
    *) echo "setup_env.sh: unknown argument '$arg' (expected --mm or --floor)" >&2; exit 2 ;;
  esac
done

log() { echo "[setup] $*"; }

stamp_of() { cat "$@" | sha256sum | cut -c1-16; }

if [ ! -x "$PY" ]; then
  log "creating virtual environment at $VENV"
  python3 -m venv "$VENV"
fi

CORE_STAMP="$(stamp_of "$ROOT/requirements-dev.txt" "$ROOT/setup.py" "$ROOT/pyproject.toml")"
if [ "$(cat "$VENV/.core-stamp" 2>/dev/null)" != "$CORE_STAMP" ]; then
  log "installing the pinned development environment (requirements-dev.txt)"
  "$PY" -m pip install -q --upgrade pip "setuptools>=77.0.3,<81" wheel  # torch needs >=77.0.3; see --mm below
  "$PY" -m pip install -q -r "$ROOT/requirements-dev.txt"
  "$PY" -m pip install -q --no-build-isolation --no-deps -e "$ROOT"
  echo "$CORE_STAMP" > "$VENV/.core-stamp"
else
  log "core environment is up to date"
fi

if [ "$WITH_MM" = 1 ]; then
  # mmengine 0.10 (at run time, for the mmdet::/mmseg:: configs ours inherit) and mmcv's setup.py import
  # pkg_resources, which setuptools >= 81 no longer ships, while torch needs setuptools >= 77.0.3. Checked on every
  # run: the core step above may have upgraded setuptools since the OpenMMLab stack was installed.
  "$PY" -m pip install -q "$(grep -E '^setuptools' "$ROOT/requirements-mm.txt" | cut -d'#' -f1 | xargs)"
  MM_STAMP="$(stamp_of "$ROOT/requirements-mm.txt" "$ROOT/tools/setup_env.sh")"
  if [ "$(cat "$VENV/.mm-stamp" 2>/dev/null)" != "$MM_STAMP" ]; then
    MMCV_VERSION=2.1.0
    TORCH_VERSION="$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')"
    PY_TAG="$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
    WHEELS="$CACHE/wheels/mmcv-$MMCV_VERSION-torch$TORCH_VERSION-$PY_TAG-cpuops"
    if ! ls "$WHEELS"/mmcv-*.whl >/dev/null 2>&1; then
      log "building mmcv $MMCV_VERSION with its CPU ops against torch $TORCH_VERSION (about 7 minutes on 2 cores)"
      WORK="$(mktemp -d)"
      mkdir -p "$WHEELS.tmp"
      # No build isolation: mmcv must compile against the installed torch.
      "$PY" -m pip download -q --no-deps --no-binary :all: --no-build-isolation -d "$WORK" "mmcv==$MMCV_VERSION"
      tar -xzf "$WORK/mmcv-$MMCV_VERSION.tar.gz" -C "$WORK"
      # torch >= 2.6 headers need C++20; mmcv 2.1.0's setup.py hard-codes -std=c++17.
      sed -i 's/-std=c++17/-std=c++20/g' "$WORK/mmcv-$MMCV_VERSION/setup.py"
      (cd "$WORK/mmcv-$MMCV_VERSION" && MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS="$(nproc)" \
        "$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$WHEELS.tmp" .)
      rm -rf "$WHEELS" && mv "$WHEELS.tmp" "$WHEELS"
      rm -rf "$WORK"
    else
      log "using cached mmcv wheel from $WHEELS"
    fi
    "$PY" -m pip install -q --no-deps "$WHEELS"/mmcv-*.whl
    "$PY" -m pip install -q addict yapf packaging Pillow "opencv-python-headless" rich termcolor
    "$PY" -m pip install -q -r "$ROOT/requirements-mm.txt"
    # mmseg 1.2.2's analysis_tools/get_flops.py works with mmengine <= 0.7.2 only (segmentation/README.md): that
    # mmengine, beside the venv's own, for running it in a segmentation-only process (its test puts it first on
    # sys.path).
    rm -rf "$VENV/mmengine-0.7.2"
    "$PY" -m pip install -q --no-deps --target "$VENV/mmengine-0.7.2" "mmengine==0.7.2"
    "$PY" -W ignore -c "import pkg_resources, mmcv, mmdet, mmseg, mmpretrain; from mmcv.ops import nms, RoIAlign"
    echo "$MM_STAMP" > "$VENV/.mm-stamp"
  else
    log "OpenMMLab environment is up to date"
  fi
fi
if [ "$WITH_FLOOR" = 1 ]; then
  FLOOR_VENV="$CACHE/venvs/floor-$(stamp_of "$ROOT/requirements-floor.txt")"
  if [ ! -f "$FLOOR_VENV/.ready" ]; then
    FLOOR_PY="${FLOOR_PYTHON:-}"
    if [ -z "$FLOOR_PY" ]; then
      for candidate in python3.10 "$(pyenv root 2>/dev/null)"/versions/3.10*/bin/python3.10 \
        "$HOME"/.pyenv/versions/3.10*/bin/python3.10; do
        if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 10)' >/dev/null 2>&1; then
          FLOOR_PY="$candidate"
          break
        fi
      done
    fi
    if [ -z "$FLOOR_PY" ]; then
      echo "setup_env.sh: --floor needs a Python 3.10 interpreter; set FLOOR_PYTHON or install python3.10" >&2
      exit 2
    fi
    log "creating the floor environment (requirements-floor.txt, $("$FLOOR_PY" --version)) at $FLOOR_VENV"
    rm -rf "$FLOOR_VENV"
    "$FLOOR_PY" -m venv "$FLOOR_VENV"
    "$FLOOR_VENV/bin/python" -m pip install -q --upgrade pip
    "$FLOOR_VENV/bin/python" -m pip install -q -r "$ROOT/requirements-floor.txt"
    touch "$FLOOR_VENV/.ready"
  else
    log "using the cached floor environment $FLOOR_VENV"
  fi
  echo "$FLOOR_VENV/bin/python" > "$VENV/floor-python"
fi
log "ready: $VENV"
