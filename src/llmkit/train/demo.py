"""The embedded demo corpus: docstrings and documentation of the installed Python standard library.

Every machine that runs llmkit has it, so ``llmkit prepare --demo`` needs no download. Sources are
parsed with ``ast`` rather than imported: importing the whole standard library runs code (``this``
prints, ``antigravity`` opens a browser) and is slow.
"""

from __future__ import annotations

import ast
import sysconfig
from pathlib import Path
from typing import Iterator

# folders whose files are tests, tools or vendored copies rather than documentation
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "lib2to3", "__pycache__",
              "turtledemo", "idlelib", "ensurepip", "venv"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _source_files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*.py")):
        if _SKIP_DIRS.intersection(path.relative_to(root).parts[:-1]):
            continue
        yield path


def _docstrings(tree: ast.AST) -> Iterator[str]:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield doc


def _topics(tree: ast.AST) -> Iterator[str]:
    """pydoc_data/topics.py holds the language reference as one dict of text: one document each."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for value in node.values:
                if isinstance(value, ast.Constant) and isinstance(value.value, str):
                    yield value.value


def stdlib_documents(root: Path | None = None) -> Iterator[tuple[str, str]]:
    """Yield (source name, text): one document per module (its docstrings joined), one per
    documentation topic."""
    root = root or stdlib_root()
    for path in _source_files(root):
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, OSError):
            continue
        name = str(path.relative_to(root))
        if name.replace("\\", "/") == "pydoc_data/topics.py":
            for i, text in enumerate(_topics(tree)):
                yield f"{name}#{i}", text
            continue
        docs = list(_docstrings(tree))
        if docs:
            yield name, "\n\n".join(docs)
