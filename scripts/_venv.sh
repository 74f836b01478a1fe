# shellcheck shell=bash
# Sourced by scripts/check, scripts/demo and scripts/bench: make .venv and keep it installed.
#
# The venv is created with the first Python >= 3.11 found ($PYTHON, python3, python3.13 ...).
# `pip install -e '.[dev]'` runs only when the venv is new or pyproject.toml changed since the
# last install (its hash is kept in .venv/.walship-installed), so repeated runs start at once.

walship_python() {
    local candidate
    for candidate in "${PYTHON:-}" python3 python3.13 python3.12 python3.11; do
        [ -n "$candidate" ] || continue
        command -v "$candidate" >/dev/null 2>&1 || continue
        if "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    echo "walship needs Python >= 3.11; set PYTHON=/path/to/python3.11 or newer" >&2
    return 1
}

walship_venv() {
    local root py stamp want
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    cd "$root"
    if [ ! -x .venv/bin/python ]; then
        py="$(walship_python)"
        echo "creating .venv with $("$py" --version 2>&1)" >&2
        "$py" -m venv .venv
    fi
    stamp=.venv/.walship-installed
    want="$(.venv/bin/python -c 'import hashlib, sys; print(hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest(), sys.version)')"
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || [ ! -x .venv/bin/walship ]; then
        echo "installing walship and its dev tools into .venv ..." >&2
        if ! .venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]' \
            >.venv/pip-install.log 2>&1; then
            tail -n 40 .venv/pip-install.log >&2
            echo "pip install failed; the whole log is in .venv/pip-install.log" >&2
            return 1
        fi
        echo "$want" >"$stamp"
    fi
    export PATH="$root/.venv/bin:$PATH"
}
