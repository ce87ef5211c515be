#!/usr/bin/env bash
# Run vdtool's whole test suite, on a fresh machine in a fresh clone.
#
#   ./scripts/test.sh                 # everything but the slow tests
#   ./scripts/test.sh -m slow         # the slow ones (fuzz, big images)
#   ./scripts/test.sh tests/test_cli.py -k resize
#
# 1. Installs the peer tools the interop tests are judged by (qemu-img,
#    qemu-io and its curl driver, the libyal readers, bximage, cloop-utils,
#    dmg2img, jq) with apt-get, those that are missing, when root or
#    password-less sudo is available; otherwise it says what to do (outside
#    CI those tests then skip; in CI, CI=true, they fail).
# 2. Installs vdtool with its test extras (pip install -e '.[test]') into
#    the current Python when its dependencies are missing; where that Python
#    refuses (no pip, or an "externally managed" system Python) it uses a
#    virtual environment .venv in the repo instead.
# 3. Runs pytest with a pytest-xdist worker per core and one more (-n 0
#    after the script's arguments runs serially);
#    extra arguments go to pytest.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"

note() { echo "test.sh: $*" >&2; }

# -- 1. peer tools ---------------------------------------------------------------
# Each judge the tests need, and the Debian package that has it.  Only the
# missing ones are installed, each on its own (one that fails to install
# leaves the others: its tests skip outside CI and fail in CI).
missing=()
want() {  # want PACKAGE TEST...: the package when none of the tests passes
    local pkg="$1"; shift
    local t
    for t in "$@"; do
        eval "$t" >/dev/null 2>&1 && return 0
    done
    missing+=("$pkg")
}
want qemu-utils "command -v qemu-img"
want libvhdi-utils "command -v vhdiinfo"
want libvmdk-utils "command -v vmdkinfo"
want libqcow-utils "command -v qcowinfo"
want bximage "command -v bximage"                        # bochs images
want cloop-utils "command -v create_compressed_fs"       # cloop images
want dmg2img "command -v dmg2img"                        # DMG images
want qemu-block-extra "ls /usr/lib/*/qemu/block-curl.so" # qemu-img reading URLs (curl driver)
want openssl "command -v openssl"                        # the https test's certificate
want jq "command -v jq"                                  # docs/pipelines.md recipes
if [ "${#missing[@]}" -gt 0 ]; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            SUDO="sudo -n"
        else
            SUDO="none"
        fi
    fi
    if [ "$SUDO" != "none" ] && command -v apt-get >/dev/null 2>&1; then
        note "installing the peer tools the tests are judged by: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        $SUDO apt-get update -q || note "apt-get update failed; trying the install anyway"
        for pkg in "${missing[@]}"; do
            $SUDO apt-get install -y -q "$pkg" || note "could not install $pkg (its tests will skip, or fail in CI)"
        done
    else
        note "missing peer tools (${missing[*]}) and I cannot install them (need root or sudo, and apt-get)."
        note "Install them yourself: sudo apt-get install ${missing[*]}"
        note "Without them their interop tests skip (outside CI) or fail (CI=true)."
    fi
fi

# -- 2. Python dependencies ---------------------------------------------------------
has_deps() {
    "$1" - <<'PYEOF' 2>/dev/null
import importlib.util, sys
if sys.version_info < (3, 10):
    sys.exit(1)
mods = ["click", "rich", "tqdm", "xxhash", "pytest", "hypothesis", "xdist", "google_crc32c"]
if sys.version_info < (3, 14):
    mods.append("backports.zstd")
import platform
if platform.python_implementation() == "CPython" and platform.machine() in ("x86_64", "AMD64", "aarch64", "arm64"):
    mods.append("isal")
sys.exit(1 if any(importlib.util.find_spec(m) is None for m in mods) else 0)
PYEOF
}

if ! command -v "$PY" >/dev/null 2>&1; then
    note "$PY not found: install Python 3.10 or newer (or set PYTHON=/path/to/python)"
    exit 1
fi

if ! has_deps "$PY"; then
    if [ -z "${VIRTUAL_ENV:-}" ] && [ -x .venv/bin/python ] && has_deps .venv/bin/python; then
        PY=.venv/bin/python
    else
        note "installing vdtool with its test extras: $PY -m pip install -e '.[test]'"
        if ! "$PY" -m pip install -q -e '.[test]'; then
            note "this Python refuses pip installs; using a virtual environment in .venv"
            if [ ! -x .venv/bin/python ]; then
                "$PY" -m venv .venv || {
                    note "cannot create .venv: install the venv module (Debian/Ubuntu: apt-get install python3-venv)"
                    exit 1
                }
            fi
            PY=.venv/bin/python
            "$PY" -m pip install -q -e '.[test]'
        fi
    fi
fi

# -- 3. the tests ------------------------------------------------------------------
# pytest-xdist workers: one per core and one more, since most tests wait on
# qemu-img, vdtool subprocesses and the disk (on 2 cores: 2 workers 10 min
# 18 s, 3 workers 7 min 18 s); the default run stays within CI's ten minutes.
workers=$(( $(nproc 2>/dev/null || echo 1) + 1 ))
exec "$PY" -m pytest -q -n "$workers" "$@"
