"""The demo (the main job of scripts/demo) runs end to end and reports agreeing numbers."""

from __future__ import annotations

import re
import subprocess
import sys


def test_demo_runs_and_matches_numpy(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "implicit_compiler.demo", "--batch", "8", "--samples", "2", "--figures", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    error = float(re.search(r"max \|y - numpy\| = (\S+)", result.stdout).group(1))
    assert error < 1e-12
    assert "matrices identical: True" in result.stdout
    assert "cyclic components solved by auto: [('h1', 'h2', 'h3')]" in result.stdout
    assert "lenet5 certified bounds over |u - u0| <= 0.01 (5 digits" in result.stdout
    assert "1,000 samples inside: True" in result.stdout
    assert result.stdout.count("verify (2 samples): PASSED") == 5  # LeNet-5, ResNet20, the LSTM, two ViTs
    assert result.stdout.count("held-out digits (450 images)") == 4 and result.stdout.count(": equal") == 4
    pictures = sorted(path.name for path in tmp_path.iterdir())
    assert "lenet5_spy.png" in pictures and "resnet20_spy.png" in pictures and "lenet5_spy_whole.png" in pictures
    assert "vit_spy.png" in pictures and "vit_legacy_spy.png" in pictures and "lenet5_bounds.png" in pictures
