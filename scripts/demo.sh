#!/usr/bin/env bash
# The main job of the README, offline on a CPU: sets up .venv (see scripts/_setup_env.sh), then
#   1. generates textured meshes (GLB) and turntables for a few prompts from the shipped model
#      (assets/att3d-shapes64) in one forward pass each, two of them never seen in training;
#   2. trains a small amortized model on 8 shapes-world prompts with the shipped prior (a few minutes);
#   3. scores it against the shapes world's ground truth.
# Arguments are extra Hydra overrides for the training run, e.g. `bash scripts/demo.sh trainer.max_steps=100`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_setup_env.sh"

step() { printf '\n== %s\n' "$*"; }

step "generate from the shipped model -> outputs/demo/"
att3d generate "a red cube" "a blue torus" "a orange cube" "a gray octahedron" --out outputs/demo

step "train the quickstart model -> runs/quickstart/"
att3d train experiment=quickstart run_dir=runs/quickstart "$@"

step "score it on its prompts -> runs/quickstart/model/eval/"
att3d eval model --checkpoint runs/quickstart/model --prompts configs/prompts/quickstart.txt --heldout ""
