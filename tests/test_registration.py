"""The Auto classes are registered in one place: ``compressm_hf.modeling.register_auto_classes`` (its table
``_AUTO_MODELS``). No modeling file registers anything itself at import time."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

MODELING = Path(__file__).resolve().parents[1] / "modeling"
TABLE = MODELING / "__init__.py"
REGISTERING = {"register", "register_for_auto_class"}


def registration_calls(path: Path) -> list[str]:
    """``name:line call`` for every ``X.register(...)`` / ``X.register_for_auto_class(...)`` call in ``path``."""
    calls = []
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in REGISTERING
        ):
            calls.append(f"{path.name}:{node.lineno} {ast.unparse(node.func)}(...)")
    return calls


def test_only_the_table_registers_auto_classes():
    files = sorted(p for p in MODELING.rglob("*.py") if p != TABLE and "__pycache__" not in p.parts)
    found = [f"{path.parent.name}/{call}" for path in files for call in registration_calls(path)]
    assert found == [], "register through compressm_hf.modeling.register_auto_classes instead:\n" + "\n".join(
        found
    )
    assert registration_calls(TABLE), "the table in modeling/__init__.py registers nothing"


@pytest.mark.parametrize(
    ("source", "call"),
    [
        ("LRUConfig.register_for_auto_class()\n", "LRUConfig.register_for_auto_class(...)"),
        ("if True:\n    AutoConfig.register('x', X)\n", "AutoConfig.register(...)"),
    ],
)
def test_a_registration_outside_the_table_is_found(tmp_path, source, call):
    probe = tmp_path / "probe.py"
    probe.write_text(source)
    assert [c.split(" ", 1)[1] for c in registration_calls(probe)] == [call]
