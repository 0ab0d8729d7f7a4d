"""`make demo`: the example app as a fresh git repository, run end to end on the sandbox."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from flows.cli import main
from sandbox.example import create_example_repo


def demo() -> int:
    with tempfile.TemporaryDirectory(prefix="buildkit-demo-") as workdir:
        pipeline_file = create_example_repo(Path(workdir) / "weather-app")
        print(f"example app committed at {pipeline_file.parent}", flush=True)
        return main(["run", "--config", str(pipeline_file), "--sandbox"])


if __name__ == "__main__":
    sys.exit(demo())
