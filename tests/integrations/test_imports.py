"""The core stays torch-only: ``import compiled_step`` (FusedOptimizer included) and the integrations
package load no trainer; only an adapter module loads its own framework. Fresh interpreters, so
modules other tests imported cannot hide an import."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
TRAINERS = ("transformers", "accelerate", "pytorch_lightning", "lightning", "safetensors", "torchtitan")


def _loaded_after(code: str) -> list[str]:
    trainers = set(TRAINERS)
    code += f"\nimport json, sys\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & {trainers!r})))"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_core_and_integrations_package_import_no_trainer():
    code = ("import torch, compiled_step, compiled_step.integrations\n"
            "from compiled_step import FusedOptimizer, FusedStep\n"
            "p = torch.nn.Parameter(torch.ones(3))\n"
            "FusedOptimizer(torch.optim.SGD([p], lr=0.1), compile=False)  # the wrapper checks import nothing\n")
    assert _loaded_after(code) == []


@pytest.mark.parametrize("module,framework", [("transformers", "transformers"), ("lightning", "pytorch_lightning")])
def test_an_adapter_loads_its_own_framework(module, framework):
    pytest.importorskip(framework)
    assert framework in _loaded_after(f"import compiled_step.integrations.{module}")
