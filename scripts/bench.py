"""Benchmark ours vs onnxruntime and torch eager on the zoo models, in one process, side by side.

    python scripts/bench.py [--models lenet5 resnet20] [--batches 1 32 256] [--quick] [--no-torch]
                            [--out out/bench] [--overwrite]
    python scripts/bench.py --implicit [--quick]   (cyclic models against the peers)

The same as ``implicit-compiler bench``: prints a table and writes bench.json and bench.md into
--out (default out/bench, relative to the current folder), never replacing them without
--overwrite. Exit status 0 success, 1 ours disagrees with onnxruntime, 2 bad input. See
``implicit_compiler.bench`` for what is measured and how.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from implicit_compiler.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["bench", *sys.argv[1:]]))
