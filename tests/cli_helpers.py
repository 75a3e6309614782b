"""Helpers shared by the command-line tests: run the real ``llmkit`` console script."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

LLMKIT = Path(sys.executable).parent / "llmkit"


def run_llmkit(*args, home: Path, input: str | None = None, timeout: float = 300):
    """Run the console script with its own store; stdin is `input`, or empty (never a tty)."""
    env = dict(os.environ, LLMKIT_HOME=str(home))
    env.pop("LLMKIT_DEBUG", None)
    return subprocess.run(
        [str(LLMKIT), *map(str, args)], input=input if input is not None else "", capture_output=True,
        text=True, encoding="utf-8", env=env, timeout=timeout,
    )
