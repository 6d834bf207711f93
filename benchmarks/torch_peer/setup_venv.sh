#!/usr/bin/env bash
# Creates (idempotently) the PyTorch peer's venv at <repo>/.venv-torch with
# Python 3.11 and installs benchmarks/torch_peer/requirements.txt into it.
# Prints the venv's python path as the last line of stdout (everything else goes
# to stderr), so callers can do: PY=$(bash benchmarks/torch_peer/setup_venv.sh).
#
# Why a separate venv: the project runs on Python 3.12, but the only CPU torch
# build that installs offline here is torch 2.13.0 for Python 3.11; on 3.12 pip
# would pull a multi-GB CUDA build. torch must stay out of the project's
# requirements, so the peer lives in its own interpreter and talks JSON lines.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="${TORCH_PEER_VENV:-$root/.venv-torch}"
req="$here/requirements.txt"
stamp="$venv/.torch_peer_requirements.sha256"

log() { echo "setup_venv.sh: $*" >&2; }

find_python311() {
  # 1) an explicit choice; 2) pyenv's 3.11.x (newest first); 3) python3.11 on PATH.
  if [[ -n "${TORCH_PEER_BASE_PYTHON:-}" ]]; then
    echo "$TORCH_PEER_BASE_PYTHON"; return 0
  fi
  local pyenv_root="" cand
  if command -v pyenv >/dev/null 2>&1; then
    pyenv_root="$(pyenv root 2>/dev/null || true)"
  fi
  pyenv_root="${pyenv_root:-${PYENV_ROOT:-$HOME/.pyenv}}"
  # sort -V -r so that e.g. 3.11.10 wins over 3.11.7.
  for cand in $(ls -d "$pyenv_root"/versions/3.11*/bin/python3.11 2>/dev/null | sort -V -r); do
    if [[ -x "$cand" ]]; then echo "$cand"; return 0; fi
  done
  if command -v python3.11 >/dev/null 2>&1; then
    command -v python3.11; return 0
  fi
  return 1
}

want_hash="$(sha256sum "$req" | cut -d' ' -f1)"
if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want_hash" ]]; then
  log "up to date: $venv"
  echo "$venv/bin/python"
  exit 0
fi

if ! base="$(find_python311)"; then
  log "ERROR: Python 3.11 not found (looked in \$(pyenv root)/versions/3.11*/bin/python3.11"
  log "and for python3.11 on PATH). The PyTorch peer needs Python 3.11 because the only"
  log "offline CPU torch wheel here is torch 2.13.0 for cp311. Install it (e.g."
  log "'pyenv install 3.11') or set TORCH_PEER_BASE_PYTHON=/path/to/python3.11."
  exit 2
fi
ver="$("$base" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if [[ "$ver" != "3.11" ]]; then
  log "ERROR: $base is Python $ver, not 3.11 (torch 2.13.0's CPU wheel is cp311 only)."
  exit 2
fi

# A venv made by another interpreter (or a half-made one) is rebuilt from scratch.
if [[ -x "$venv/bin/python" ]]; then
  have="$("$venv/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true)"
  if [[ "$have" != "3.11" ]]; then
    log "existing $venv is Python '${have:-broken}', recreating"
    rm -rf "$venv"
  fi
fi
if [[ ! -x "$venv/bin/python" ]]; then
  log "creating $venv with $base"
  "$base" -m venv "$venv"
fi

log "installing $req (torch ~200 MB, a minute or two)"
# Clear PYTHONPATH/PYTHONHOME so a 3.12 environment can't leak into the 3.11 install.
env -u PYTHONPATH -u PYTHONHOME "$venv/bin/python" -m pip install --quiet -r "$req" >&2
# A quick import check before stamping, so a broken install is retried next time.
env -u PYTHONPATH -u PYTHONHOME "$venv/bin/python" -c 'import torch; print("torch", torch.__version__)' >&2
echo "$want_hash" > "$stamp"
echo "$venv/bin/python"
