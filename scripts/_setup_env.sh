# Shared set-up of scripts/test.sh and scripts/demo.sh (sourced, not run): makes sure the virtual
# environment .venv exists and holds att3d (editable, with its dev tools), then cds to the repository
# root and puts .venv/bin first on PATH.
#
# torch is installed FIRST, pinned (ATT3D_TORCH, default torch==2.13.0), and kept as a constraint while
# att3d's own dependencies are installed, so that pip never swaps in another torch build (an unpinned
# resolve can pull gigabytes of CUDA wheels onto a CPU machine). To choose a build, set pip's own
# variables, e.g. PIP_INDEX_URL or PIP_FIND_LINKS. The set-up is redone only when pyproject.toml or the
# torch pin change (or with ATT3D_REINSTALL=1). Other variables: PYTHON (the interpreter that creates
# .venv, default python3), ATT3D_VENV (default .venv).

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${ATT3D_VENV:-$ROOT/.venv}"
TORCH_REQ="${ATT3D_TORCH:-torch==2.13.0}"
PYTHON="${PYTHON:-python3}"

_att3d_die() { echo "att3d set-up: $*" >&2; exit 1; }

if [ ! -x "$VENV/bin/python" ]; then
  [ ! -e "$VENV" ] || _att3d_die "$VENV exists but is not a virtual environment; move it away and rerun"
  command -v "$PYTHON" >/dev/null 2>&1 || _att3d_die "no '$PYTHON' found; install Python >= 3.10 (or set PYTHON=...)"
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || _att3d_die "att3d needs Python >= 3.10; '$PYTHON' is $("$PYTHON" -V 2>&1)"
  echo "att3d set-up: creating $VENV with $("$PYTHON" -V 2>&1)"
  "$PYTHON" -m venv "$VENV" \
    || { rm -rf "$VENV"; _att3d_die "could not create $VENV (on Debian/Ubuntu: apt-get install python3-venv)"; }
fi

_att3d_stamp="$VENV/.att3d-setup"
_att3d_want="$TORCH_REQ $(cksum < pyproject.toml)"
if [ "${ATT3D_REINSTALL:-0}" != "0" ] || [ "$(cat "$_att3d_stamp" 2>/dev/null)" != "$_att3d_want" ]; then
  rm -f "$_att3d_stamp"
  _att3d_pip() { "$VENV/bin/python" -m pip install --quiet --progress-bar off --disable-pip-version-check "$@"; }
  echo "att3d set-up: installing $TORCH_REQ into $VENV"
  _att3d_pip "$TORCH_REQ" || _att3d_die "could not install $TORCH_REQ"
  printf '%s\n' "$TORCH_REQ" > "$VENV/torch-constraint.txt"
  echo "att3d set-up: installing att3d (editable) with its dependencies and dev tools"
  _att3d_pip -c "$VENV/torch-constraint.txt" -e ".[dev]" || _att3d_die "could not install att3d"
  printf '%s\n' "$_att3d_want" > "$_att3d_stamp"
fi

export PATH="$VENV/bin:$PATH"
export VIRTUAL_ENV="$VENV"
