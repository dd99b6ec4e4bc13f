"""Stochastic rounding on 2 gloo ranks: a DDP model's replicated bfloat16 params round identically on every rank,
with torch's AdamW and ``FusedStepConfig.stochastic_rounding``, and with torchao's
``_AdamW(bf16_stochastic_round=True)`` (where torchao is installed).

The random bits are a pure function of (seed, step count, element place, store) and the plan is the same on
every rank, so the ranks stay bit-identical with no communication beyond DDP's own grad all-reduce; and they
rounded stochastically (they differ from the round-to-nearest run of the same steps).
"""

import torch

from .harness import run_distributed


def _worker(rank: int, world: int):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from compiled_step import FusedStep

    def train(stochastic: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)  # the same initial weights on both ranks, as DDP requires
        model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8))
        model = DDP(model.to(torch.bfloat16))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        fused = FusedStep(opt, max_grad_norm=1.0, model_parts=[model], compile_notice=False,
                          stochastic_rounding="params" if stochastic else ())
        for step in range(4):
            x = torch.randn(8, 64, generator=torch.Generator().manual_seed(100 * step + rank)).bfloat16()
            model(x).float().square().mean().backward()  # each rank its own batch; DDP averages the grads
            fused.step()
            fused.zero_grad()
        return [p.detach().clone() for p in model.parameters()]

    def train_torchao(stochastic: bool) -> list[torch.Tensor]:
        """torchao's _AdamW(bf16_stochastic_round=True): the optimizer asks for the rounding itself. Eager
        (compile=False): the bits are the same integer hash compiled or not, and compiling would cost the suite."""
        from torchao.optim import _AdamW

        torch.manual_seed(0)
        model = DDP(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8)).bfloat16())
        fused = FusedStep(_AdamW(model.parameters(), lr=1e-3, bf16_stochastic_round=stochastic), max_grad_norm=1.0,
                          model_parts=[model], compile=False, compile_notice=False)
        for step in range(4):
            x = torch.randn(8, 64, generator=torch.Generator().manual_seed(100 * step + rank)).bfloat16()
            model(x).float().square().mean().backward()
            fused.step()
            fused.zero_grad()
        return [p.detach().clone() for p in model.parameters()]

    stochastic, nearest = train(True), train(False)
    try:
        import torchao.optim  # noqa: F401
    except ImportError:
        return {"stochastic": stochastic, "nearest": nearest}
    return {"stochastic": stochastic, "nearest": nearest,
            "torchao_stochastic": train_torchao(True), "torchao_nearest": train_torchao(False)}


def test_replicated_bf16_params_round_identically_on_every_rank():
    a, b = run_distributed(_worker, world_size=2, timeout=240)
    runs = [("stochastic", "nearest")] + ([("torchao_stochastic", "torchao_nearest")] if "torchao_stochastic" in a
                                          else [])
    for stochastic, nearest in runs:
        for x, y in zip(a[stochastic], b[stochastic]):
            assert torch.equal(x, y), stochastic  # bit-identical across ranks
        assert any(not torch.equal(x, y) for x, y in zip(a[stochastic], a[nearest])), stochastic  # and stochastic
        for x, y in zip(a[nearest], b[nearest]):
            assert torch.equal(x, y), nearest
