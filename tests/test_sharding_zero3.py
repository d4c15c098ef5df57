"""DeepSpeed ZeRO-3 for real on CPU (2 gloo ranks): full weights are gathered for the vLLM sync and the export.

Lightning's DeepSpeedStrategy refuses CPU, so the script drives ``deepspeed.initialize`` itself; what it
checks is this project's gathering code on genuinely partitioned parameters.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from lightning.fabric.plugins.environments.lightning import find_free_network_port

pytestmark = pytest.mark.distributed
pytest.importorskip("deepspeed", reason="deepspeed is not installed: pip install -e '.[dev]' brings it")

HERE = Path(__file__).parent


def test_zero3_partitions_are_gathered_for_sync_and_export(tmp_path):
    out = tmp_path / "checks.json"
    port = str(find_free_network_port())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    cmd += [str(HERE / "zero3_script.py"), str(out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    checks = json.loads(out.read_text())
    assert checks == dict.fromkeys(checks, True) and len(checks) == 9, checks
