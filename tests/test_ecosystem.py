"""torch.optim conventions: FusedStep's own state_dict, its repr, warnings that point at the caller,
the one-line compile notice, and the README's code blocks, run as written.

References: the first run of the same steps (bit-identical resume), torch's own warnings module
(the warning's file and line), and the README itself.
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from compiled_step import FusedStep
from conftest import BUCKET, PACK, make_grads, make_params, set_grads

README = Path(__file__).resolve().parents[1] / "README.md"


def test_fused_state_dict_round_trip_resumes_bit_identically():
    params = make_params()
    opt = torch.optim.AdamW(params, lr=1e-2)
    fused = FusedStep(opt, max_grad_norm=1.0, bucket_size=BUCKET, pack_threshold=PACK)
    for step in range(4):
        grads = make_grads(params, step)
        if step == 2:
            grads[0].view(-1)[0] = float("nan")  # one skipped step, counted
        set_grads(params, grads)
        fused.step()
    saved = copy.deepcopy((fused.state_dict(), opt.state_dict(), [p.detach().clone() for p in params]))
    assert int(saved[0]["fused_step"]["skipped_steps"]) == 1 and bool(saved[0]["fused_step"]["last_step_finite"])

    for step in range(4, 7):
        set_grads(params, make_grads(params, step))
        fused.step()

    resumed = [torch.nn.Parameter(t.clone()) for t in saved[2]]
    opt2 = torch.optim.AdamW(resumed, lr=1e-2)
    opt2.load_state_dict(saved[1])
    fused2 = FusedStep(opt2, max_grad_norm=1.0, bucket_size=BUCKET, pack_threshold=PACK)
    fused2.load_state_dict(saved[0])
    assert int(fused2.skipped_steps) == 1
    for step in range(4, 7):
        set_grads(resumed, make_grads(resumed, step))
        fused2.step()
    assert all(torch.equal(a, b) for a, b in zip(params, resumed))
    assert int(fused2.skipped_steps) == int(fused.skipped_steps) == 1


def test_fused_load_state_dict_refuses_bad_input_before_changing_anything():
    fused = FusedStep(torch.optim.SGD(make_params(), lr=0.1), max_grad_norm=1.0)
    with pytest.raises(KeyError, match="lacks"):
        fused.load_state_dict({"skipped_steps": 3})
    with pytest.raises(TypeError, match="must be a one-element tensor or a number"):
        fused.load_state_dict({"skipped_steps": "3", "last_step_finite": True})
    assert int(fused.state_dict()["fused_step"]["skipped_steps"]) == 0


def test_repr_shows_the_optimizer_options_and_the_plan_once_built():
    params = make_params()
    fused = FusedStep(torch.optim.AdamW(params, lr=1e-2), max_grad_norm=1.0, bucket_size=BUCKET, pack_threshold=PACK)
    assert "FusedStep(AdamW, max_grad_norm=1.0" in repr(fused) and "not built yet" in repr(fused)
    set_grads(params, make_grads(params, 0))
    fused.step()
    text = repr(fused)
    assert "group 0: param_groups[0], cpu, float32" in text and "9 params (9 aliased)" in text, text
    assert "program: 3 calls" in text, text


def test_copied_grads_warn_once_at_the_callers_line_and_name_the_param_and_the_cause():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    fused = FusedStep(torch.optim.SGD(model.parameters(), lr=0.1), max_grad_norm=1.0, model_parts=[model])
    model(torch.randn(2, 4)).sum().backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused.step()  # the first step installs the buffers: no warning of ours
    assert not [w for w in caught if "FusedStep copied" in str(w.message)]
    fused.optimizer.zero_grad()  # set_to_none: the hooks put the buffers back in backward, no copy
    model(torch.randn(2, 4)).sum().backward()
    for p in model.parameters():
        p.grad = p.grad.clone()  # assigned: these must be copied in
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = sys._getframe().f_lineno + 1
        fused.step()
    ours = [w for w in caught if "FusedStep copied" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    w = ours[0]
    assert w.filename == __file__ and w.lineno == line, (w.filename, w.lineno)
    assert "FusedStep copied the grad of 0.weight and 1 other param(s) into" in str(w.message)
    assert "the grad was a new tensor: assigned to p.grad" in str(w.message)
    assert fused.last_step_copied_grads == ("0.weight", "0.bias")
    model(torch.randn(2, 4)).sum().backward()
    model[0].weight.grad = model[0].weight.grad.clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused.step()
    assert not [w for w in caught if "FusedStep copied" in str(w.message)]  # once per FusedStep
    assert fused.last_step_copied_grads == ("0.weight",)


def test_first_compile_announces_itself_once_per_process_on_stderr():
    """In a fresh interpreter, with stderr redirected (not a TTY): one line before the first compile,
    none for a second FusedStep, none with compile_notice=False."""
    code = (
        "import torch\n"
        "from compiled_step import FusedStep\n"
        "for notice in (True, True):\n"
        "    p = torch.nn.Parameter(torch.randn(5)); p.grad = torch.randn(5)\n"
        "    FusedStep(torch.optim.SGD([p], lr=0.1), max_grad_norm=1.0, compile_notice=notice).step()\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [line for line in run.stderr.splitlines() if line.startswith("compiled_step")]
    assert len(lines) == 1, run.stderr
    assert "compiling the optimizer step's graphs" in lines[0] and "compile_notice=False" in lines[0]
    quiet = subprocess.run([sys.executable, "-c", code.replace("(True, True)", "(False, False)")],
                           capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0 and "compiled_step" not in quiet.stderr, quiet.stderr


# ----------------------------------------------------------------------------- README code blocks


def _python_blocks() -> list[tuple[int, str]]:
    text = README.read_text()
    return [(text[: m.start()].count("\n") + 1, m.group(1)) for m in re.finditer(r"```python\n(.*?)```", text, re.S)]


def _prelude() -> dict:
    """What the README's snippets assume exists: a tiny model, its data and loss, in a one-rank world."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(32, 16), torch.nn.Linear(16, 32))
    batches = [torch.randint(0, 32, (4, 9)) for _ in range(3)]

    def loss_fn(logits, labels):
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)

    return {"torch": torch, "model": model, "loader": [{"input_ids": b[:, :-1], "labels": b[:, 1:]} for b in batches],
            "loss_fn": loss_fn}


def test_readme_has_code_blocks():
    assert len(_python_blocks()) >= 4


@pytest.mark.parametrize("line,code", _python_blocks(), ids=lambda v: f"line{v}" if isinstance(v, int) else "")
def test_readme_code_block_runs_as_written(line, code, tmp_path, monkeypatch):
    from compiled_step.cli.graphs import single_rank_world

    monkeypatch.chdir(tmp_path)  # blocks that write checkpoints write here
    namespace = _prelude()
    with single_rank_world():
        exec(compile(code, f"README.md:{line}", "exec"), namespace)
