"""On a terminal, the lines printed at the end of a run start a line of their own, not the bar's last line."""

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios

import pytest
from support import ROOT, tiny_args

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _on_a_terminal(args: list[str]) -> str:
    """What ``gspo-lightning fit args`` writes to a pseudo-terminal (standard output and error both), ANSI codes
    removed."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # tqdm sizes its bar to the terminal
    env = {**os.environ, "COLUMNS": "120", "TERM": "xterm", "PYTHONPATH": str(ROOT / "tests")}
    cmd = [sys.executable, "-m", "gspo_lightning.cli", "fit", *args]
    proc = subprocess.Popen(cmd, stdout=slave, stderr=slave, env=env, cwd=ROOT)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # the terminal closed: the run ended
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=600) == 0, b"".join(chunks)[-3000:]
    return ANSI.sub("", b"".join(chunks).decode(errors="replace"))


@pytest.mark.parametrize("bar", ["rich", "tqdm"])
def test_end_of_run_lines_are_not_glued_to_the_bar(tmp_path, bar):
    extra = ["--trainer.enable_progress_bar", "true"]
    if bar == "tqdm":
        extra += ["--trainer.callbacks+=lightning.pytorch.callbacks.TQDMProgressBar"]
    out = _on_a_terminal(tiny_args(tmp_path, *extra, max_steps=4))
    assert "optimizer steps" in out, "the bar was drawn"
    for text in ("Held-out accuracy on 8 prompts", "Final policy saved as a Hugging Face folder"):
        at = out.index(text)
        # at the start of a line, or where a carriage return put the cursor; the bar's last line ended in
        # "s/rollout: 0.07" followed by spaces, then the table, before the fix
        assert at == 0 or out[at - 1] in "\r\n", repr(out[max(0, at - 200) : at + 40])
