"""Which fluxfill files a module uses, found from its imports, and one hash over their bytes.

:func:`imported_files` follows every import of a fluxfill module (``from .x import y``, ``from . import x``,
``import fluxfill.x``, at module level or inside a function) through the whole package, and adds the
package data (``fluxfill/configs/*.json``) when a module that reads it is among them. Training puts
:func:`digest` of ``imported_files("train")`` into its checkpoint fingerprint, so an edit to any file the
training step can run (``objective.py``, ``fusion.py``, ``models.py``, ...) starts a fresh run.
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

PACKAGE = "fluxfill"
PACKAGE_DIR = Path(__file__).resolve().parent
# package data and the module that reads it
DATA = {"models": ("configs", "*.json")}


def _file(name: str, root: Path) -> Path | None:
    """``"train"`` -> ``<root>/train.py``; ``""`` -> ``<root>/__init__.py``; None for a name that is no module."""
    parts = [p for p in name.split(".") if p]
    path = root.joinpath(*parts)
    for candidate in (path.with_suffix(".py") if parts else None, path / "__init__.py"):
        if candidate is not None and candidate.is_file():
            return candidate
    return None


def _imports(source: str, package: str) -> set[str]:
    """Module names (relative to the package, ``""`` for the package itself) that ``source`` imports."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0 and not (node.module or "").startswith(PACKAGE):
                continue
            # level 1 in a module of the package (no sub-packages here) is the package itself
            base = (node.module or "") if node.level else (node.module or "").removeprefix(PACKAGE).lstrip(".")
            found.add(base)
            found.update(f"{base}.{a.name}".lstrip(".") for a in node.names)  # `from . import tracking`
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix(PACKAGE).lstrip(".") for a in node.names
                         if a.name == PACKAGE or a.name.startswith(PACKAGE + "."))
    return found


def imported_files(module: str, root: Path | None = None) -> list[Path]:
    """``module``'s file and every package file it imports, directly or not, plus the data they read; sorted."""
    root = root or PACKAGE_DIR
    todo, seen = [module], set()
    files: set[Path] = set()
    while todo:
        name = todo.pop()
        path = _file(name, root)
        if name in seen or path is None:  # `from .config import Params`: "config.Params" is no module
            continue
        seen.add(name)
        files.add(path)
        todo.extend(_imports(path.read_text(encoding="utf-8"), PACKAGE))
        if name in DATA:
            folder, pattern = DATA[name]
            files.update((root / folder).glob(pattern))
    return sorted(files)


def digest(files: list[Path], root: Path | None = None) -> str:
    """sha256 over the files' paths (relative to ``root``) and bytes."""
    root = root or PACKAGE_DIR
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(root).as_posix().encode() + b"\0")
        h.update(f.read_bytes() + b"\0")
    return h.hexdigest()


def module_digest(module: str, root: Path | None = None) -> str:
    """:func:`digest` of :func:`imported_files` of ``module``."""
    root = root or PACKAGE_DIR
    return digest(imported_files(module, root), root)
