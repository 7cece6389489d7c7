#!/usr/bin/env bash
# The main job of the README: sets up .venv (see scripts/_setup_env.sh) and trains the quickstart
# amortized model on the shapes world, offline on a CPU. Arguments are extra Hydra overrides for the
# training run, e.g. `bash scripts/demo.sh trainer.max_steps=200`. Each step below is one `step` line
# and its command; append later steps (generate, eval, ...) the same way.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_setup_env.sh"

step() { printf '\n== %s\n' "$*"; }

step "train the quickstart model: att3d train experiment=quickstart $*"
att3d train experiment=quickstart "$@"
