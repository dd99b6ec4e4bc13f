"""``matrices.py``: the data types of matrix stacks, below ``planning`` in the import order (issue 23: no
import circle; ``planning`` lays the stacks out and imports ``matrices``, never the other way)."""

import ast
from pathlib import Path

import torch

from compiled_step import matrices, planning
from compiled_step.rules import adafactor

PACKAGE = Path(matrices.__file__).parent


def _package_imports(module) -> set[str]:
    """The ``compiled_step`` modules ``module``'s source imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(Path(module.__file__).read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("compiled_step"):
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("compiled_step")}
    return found


def test_matrices_imports_nothing_of_the_package_and_planning_imports_it():
    assert _package_imports(matrices) == set()
    assert "compiled_step.matrices" in _package_imports(planning)


def test_stacks_of_any_rank_are_whole_shaped():
    params = [torch.zeros(2, 3, 4), torch.zeros(5), torch.zeros(2, 3, 4), torch.zeros(())]
    (group,) = planning.build_plan([params], matrix_groups={0: adafactor}).groups
    shapes = {st.shape: st.members for st in group.stacks}
    assert shapes == {(): (3,), (2, 3, 4): (0, 2), (5,): (1,)}
    for st in group.stacks:
        assert st.whole_shape == st.shape
        assert st.rows_per_matrix == -(-(matrices.numel(st.shape) + 1) // planning.ROW)
    assert matrices.group_param_bytes(group) == (2 * 24 + 5 + 1) * 4
