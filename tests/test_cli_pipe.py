"""A reader that goes away early (`gateway config-schema | head`) ends the command quietly, as other Unix tools do."""

from __future__ import annotations

import subprocess
import sys


def test_a_closed_pipe_ends_the_command_without_a_traceback() -> None:
    with subprocess.Popen([sys.executable, "-m", "gateway", "config-schema"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) as proc:  # closes stderr too
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()  # the reader leaves before the command has written anything
        err = proc.stderr.read().decode()
        proc.wait(timeout=30)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
