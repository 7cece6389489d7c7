#!/usr/bin/env bash
# The test command of the README: sets up .venv (see scripts/_setup_env.sh), lints (ruff, the import contract),
# runs the test suite.
#   bash scripts/test.sh                    # everything
#   bash scripts/test.sh -m "not slow" -x   # extra arguments go to pytest
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_setup_env.sh"

echo "== ruff check att3d tests scripts"
python -m ruff check att3d tests scripts
echo "== lint-imports (the layering contract of pyproject.toml: no cycles, no upward imports, no library -> CLI)"
lint-imports --no-cache
bash scripts/install_browser.sh  # Chromium for tests/test_demo_browser.py (apt-get when missing)
bash scripts/install_gltf_validator.sh  # the Khronos glTF validator for tests/test_gltf.py (npm, once)
echo "== pytest"
exec python -m pytest -q "$@"
