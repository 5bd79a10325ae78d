"""Forced copies in the modeling files stay equal to their sources (transformers' ``# Copied from`` discipline).

A modeling file is copied next to a saved model for ``trust_remote_code`` and may import only torch,
transformers and files of its own folder, so a few definitions of ``compressm_hf`` (or of transformers) are
copied by hand. Each copy carries, on the line above it (above its decorators, or between them and the
``class`` / ``def`` line)::

    # Copied from compressm_hf.protocol.ParamSwap
    # Copied from transformers.models.mamba.modeling_mamba.MambaRMSNorm with Mamba->LRU

``with A->B, C->D`` lists plain-text replacements applied to the source, in order (as in transformers'
``utils/check_copies.py``). The source is any importable ``module.Object`` (or ``module.Class.method``): in
``compressm_hf``, in another modeling file (``compressm_hf.modeling.mamba.modeling_common.X``) or in
transformers. The check compares the whole definition (decorators, docstring and comments included) after
removing the common indentation; it fails with a diff naming both places.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import inspect
import re
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODELING = ROOT / "modeling"

_MARKER = re.compile(r"^\s*#\s*Copied from\s+(?P<source>[\w.]+)(?:\s+with\s+(?P<replacements>.+?))?\s*$")
_REPLACEMENT = re.compile(r"^\s*(?P<old>\S+)\s*->\s*(?P<new>\S+)\s*$")


@dataclass
class Marker:
    """One ``# Copied from`` line: ``path`` (the copy's file), ``line`` (1-based), the dotted ``source`` and the
    ``(old, new)`` replacements."""

    path: Path
    line: int
    source: str
    replacements: list[tuple[str, str]]


def _shown(path: Path) -> str:
    """``path`` relative to the repository (or the library folder it lives in)."""
    path = Path(path)
    for base in (ROOT, *(Path(p) for p in sys.path if p)):
        try:
            return str(path.relative_to(base))
        except ValueError:
            continue
    return path.name


def find_markers(path: Path) -> list[Marker]:
    """Every ``# Copied from`` marker of the Python file ``path``.

    Raises:
        ValueError: a ``with`` clause that is not a comma-separated list of ``old->new``.
    """
    markers = []
    for number, text in enumerate(Path(path).read_text("utf-8").splitlines(), start=1):
        found = _MARKER.match(text)
        if not found:
            continue
        replacements = []
        for part in found["replacements"].split(",") if found["replacements"] else []:
            pair = _REPLACEMENT.match(part)
            if pair is None:
                raise ValueError(
                    f"{_shown(path)}:{number}: replacement {part.strip()!r} is not of the form A->B."
                )
            replacements.append((pair["old"], pair["new"]))
        markers.append(Marker(Path(path), number, found["source"], replacements))
    return markers


def _definitions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def _start(node) -> int:
    return min([node.lineno, *(d.lineno for d in node.decorator_list)])


def _node_text(lines: list[str], node) -> str:
    """The definition's source (decorators included, ``# Copied from`` lines dropped), dedented."""
    body = [line for line in lines[_start(node) - 1 : node.end_lineno] if not _MARKER.match(line)]
    return textwrap.dedent("\n".join(body)).strip("\n") + "\n"


def copied_code(marker: Marker) -> str:
    """The definition that starts on the line after ``marker`` (or whose ``class``/``def`` line follows it).

    Raises:
        ValueError: no class or function follows the marker.
    """
    text = marker.path.read_text("utf-8")
    for node in _definitions(ast.parse(text)):
        if marker.line + 1 in (_start(node), node.lineno):
            return _node_text(text.splitlines(), node)
    raise ValueError(
        f"{_shown(marker.path)}:{marker.line}: `# Copied from {marker.source}` is not followed by a class or def."
    )


def source_code(dotted: str) -> tuple[str, str]:
    """``(code, where)`` of the definition ``dotted`` (``package.module.Name`` or ``package.module.Class.name``).

    Raises:
        ValueError: no importable module prefix, or the module defines no such name.
    """
    parts = dotted.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            module = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        path = Path(inspect.getsourcefile(module))
        text = path.read_text("utf-8")
        scope = ast.parse(text).body
        node = None
        for name in parts[cut:]:
            node = next(
                (
                    n
                    for n in scope
                    if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name
                ),
                None,
            )
            if node is None:
                raise ValueError(f"`{dotted}`: {_shown(path)} defines no `{'.'.join(parts[cut:])}`.")
            scope = node.body
        return _node_text(text.splitlines(), node), f"{dotted} ({_shown(path)}:{_start(node)})"
    raise ValueError(f"`{dotted}`: no importable module in that name.")


def copy_difference(marker: Marker) -> str | None:
    """``None`` when the copy after ``marker`` equals its source (replacements applied), else a unified diff
    from the source to the copy, naming both places."""
    expected, where = source_code(marker.source)
    for old, new in marker.replacements:
        expected = expected.replace(old, new)
    found = copied_code(marker)
    if found == expected:
        return None
    diff = difflib.unified_diff(
        expected.splitlines(keepends=True),
        found.splitlines(keepends=True),
        fromfile=f"source {where}" + (f" with {marker.replacements}" if marker.replacements else ""),
        tofile=f"copy {_shown(marker.path)}:{marker.line + 1}",
    )
    return "".join(diff)


def _modeling_files() -> list[Path]:
    """The Python files under ``modeling/``, each once (the symbolic links to shared files are skipped)."""
    return sorted(p for p in MODELING.rglob("*.py") if not p.is_symlink() and "__pycache__" not in p.parts)


MARKERS = [m for path in _modeling_files() for m in find_markers(path)]


def test_the_known_forced_copies_are_marked():
    sources = {m.source for m in MARKERS}
    assert {
        "compressm_hf.protocol.ParamSwap",
        "compressm_hf.protocol.LTISystem",
        "transformers.models.mamba.modeling_mamba.MambaRMSNorm",
    } <= sources, sources


@pytest.mark.parametrize(
    "marker", MARKERS, ids=lambda m: f"{m.path.name}:{m.line}:{m.source.rsplit('.', 1)[-1]}"
)
def test_copy_equals_its_source(marker):
    difference = copy_difference(marker)
    assert difference is None, f"the copy differs from its source:\n{difference}"


# ------------------------------------------------------------------------------ the check itself can fail


def _protocol_copy() -> str:
    """A module holding a faithful copy of ``compressm_hf.protocol.ParamSwap`` renamed ``MySwap``: the marker on
    line 6, the class on line 7."""
    code, _ = source_code("compressm_hf.protocol.ParamSwap")
    header = "import torch\nfrom typing import NamedTuple\n\n\n"
    return (
        "\n"
        + header
        + "# Copied from compressm_hf.protocol.ParamSwap with ParamSwap->MySwap\n"
        + code.replace("ParamSwap", "MySwap")
    )


def _write(tmp_path, text: str) -> Path:
    path = tmp_path / "modeling_copy.py"
    path.write_text(text)
    return path


def test_an_exact_copy_with_replacements_passes(tmp_path):
    (marker,) = find_markers(_write(tmp_path, _protocol_copy()))
    assert marker.replacements == [("ParamSwap", "MySwap")]
    assert copy_difference(marker) is None


def test_an_altered_copy_fails_with_a_diff_naming_both_places(tmp_path):
    path = _write(
        tmp_path, _protocol_copy().replace("    keep: torch.Tensor | None", "    kept: torch.Tensor")
    )
    (marker,) = find_markers(path)
    difference = copy_difference(marker)
    assert difference is not None
    assert "compressm_hf.protocol.ParamSwap (compressm_hf/protocol.py:" in difference
    assert "copy modeling_copy.py:7" in difference  # the class line, below the marker
    assert "-    keep: torch.Tensor | None" in difference and "+    kept: torch.Tensor" in difference


def test_a_copy_of_a_method_and_a_marker_between_decorator_and_def(tmp_path):
    text = textwrap.dedent(
        """
        class Holder:
            @property
            # Copied from compressm_hf.protocol.LTISystem.state_size
            def state_size(self) -> int:
                return int(self.A.shape[-1])
        """
    )
    (marker,) = find_markers(_write(tmp_path, text))
    assert copy_difference(marker) is None
    (marker,) = find_markers(_write(tmp_path, text.replace("[-1]", "[0]")))
    assert "+    return int(self.A.shape[0])" in copy_difference(marker)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (
            "# Copied from compressm_hf.protocol.NoSuchThing\nclass NoSuchThing:\n    pass\n",
            "defines no `NoSuchThing`",
        ),
        ("# Copied from no_such_package.module.Thing\nclass Thing:\n    pass\n", "no importable module"),
        ("# Copied from compressm_hf.protocol.ParamSwap\nx = 1\n", "not followed by a class or def"),
        (
            "# Copied from compressm_hf.protocol.ParamSwap with ParamSwap\nclass ParamSwap:\n    pass\n",
            "A->B",
        ),
    ],
)
def test_a_broken_marker_is_an_error_not_a_pass(tmp_path, text, match):
    with pytest.raises(ValueError, match=match):
        for marker in find_markers(_write(tmp_path, text)):
            copy_difference(marker)
