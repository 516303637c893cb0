#!/usr/bin/env bash
# Run the test suite on one torch release: scripts/test-torch.sh VERSION [pytest arguments]
#
# Builds (or reuses) a venv with torch==VERSION, installs this project with --no-deps, then its runtime and
# `dev` dependencies by name under a constraint that pins torch, so pip never changes torch; checks the
# version and runs pytest from the repository root (default arguments: -q -n 2 --dist loadfile).
# Environment: VENV_ROOT (default /work/venvs; the venv is $VENV_ROOT/torch-VERSION), PYTHON (default python3).
# The machine-wide pip config is skipped (XDG_CONFIG_DIRS=/nonexistent): it may cap torch. Extra package
# sources can still come in through PIP_INDEX_URL / PIP_EXTRA_INDEX_URL / PIP_FIND_LINKS.
set -euo pipefail
if [[ $# -lt 1 || ! $1 =~ ^[0-9]+\.[0-9]+(\.[0-9]+)?$ ]]; then
  echo "usage: scripts/test-torch.sh VERSION [pytest arguments], e.g. scripts/test-torch.sh 2.15.0 -n 1" >&2
  exit 2
fi
version=$1
shift
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${VENV_ROOT:-/work/venvs}/torch-$version
export XDG_CONFIG_DIRS=/nonexistent

if [[ ! -x $venv/bin/python ]]; then
  "${PYTHON:-python3}" -m venv "$venv"
fi
py=$venv/bin/python
constraints=$venv/torch-constraint.txt
echo "torch==$version" > "$constraints"
export PIP_CONSTRAINT=$constraints

"$py" -m pip install -q "torch==$version"
"$py" -m pip install -q --no-deps -e "$root"
# The runtime and dev dependencies by name, read from pyproject.toml (torch itself stays pinned).
mapfile -t deps < <("$py" - "$root/pyproject.toml" <<'PY'
import re, sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
for dep in project["dependencies"] + project["optional-dependencies"]["dev"]:
    if re.split(r"[\s\[<>=!~;]", dep, maxsplit=1)[0].lower() != "torch":
        print(dep)
PY
)
"$py" -m pip install -q "${deps[@]}"

installed=$("$py" -c "import torch; print(torch.__version__.split('+')[0])")
if [[ $installed != "$version" ]]; then
  echo "test-torch.sh: the venv has torch $installed, expected $version" >&2
  exit 1
fi
echo "test-torch.sh: torch $installed in $venv"
cd "$root"
if [[ $# -eq 0 ]]; then
  set -- -q -n 2 --dist loadfile
fi
PATH=$venv/bin:$PATH PYTHONPATH=$root exec "$py" -m pytest "$@"
