"""FusedStep's options: one keyword-only dataclass per concern, validated on construction."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields

from compiled_step import experts


@dataclass(frozen=True, kw_only=True)
class FusedStepConfig:
    """What the step computes and how it is compiled. Raises ``TypeError``/``ValueError`` on bad values."""

    max_grad_norm: float | None = None  # None: no clipping (the norm is still computed and returned)
    norm_type: float = 2.0  # 1, 2, inf or any finite p > 0
    # Raise RuntimeError on a non-finite norm instead of skipping the step; the raised step changes nothing. The host
    # reads the finite flag after the finish (a sync), which also splits the step's CUDA graphs there.
    error_if_nonfinite: bool = False
    compile: bool = True  # False runs the same functions eagerly
    backend: object = "inductor"  # torch.compile backend (a counting or recording backend in tests)
    bucket_size: int = 16  # tensors per compiled call for params that stay where they are
    pack_threshold: int = 16384  # such params with at most this many local elements go through the flat buffer
    # Move plain params into one flat buffer per group: p.data becomes a view with a storage of its own, so
    # torch.save, safetensors and save_pretrained still write each param. False: they stay where they are (staged or
    # bucketed like DTensor shards, which never move).
    flat_params: bool = True
    # On CUDA, capture the step's program as CUDA graphs at a plan's second step and replay them (cuda_graphs.py).
    # Must be the same on every rank. Captured NCCL collectives are invisible to the watchdog: False keeps them eager.
    cuda_graphs: bool = True
    # Inductor's combo kernels (CUDA only: several pointwise kernels of a graph in one launch). None: the
    # COMPILED_STEP_COMBO_KERNELS environment variable (0 or 1) if set, else on where this torch has all of
    # their settings (2.13 and newer; off on 2.11). True on a torch that lacks them raises ValueError.
    combo_kernels: bool | None = None
    verbose: bool = False  # print every compile to stderr (they are always logged at INFO)
    compile_notice: bool = True  # one line on stderr before the first compile of the process
    # Training health, all off by default: computed in the step's own calls without a host sync, its state on the
    # device across plan rebuilds and in fused.state_dict() (a resume is bit-identical), the same decision on every
    # rank (each sees the same total norm). fused.clip_coef is the coefficient the last update applied.
    #
    # param_norms: fused.param_norms, a float64 [N] tensor updated in place, each param's pre-clip norm (norm_type)
    # of its scaled grad, in the optimizers' param_groups order (0 without a grad); sharded params' norms are global,
    # reduced in the step's own collectives. fused.param_norms_by_name() reads it to the host as {name: float}
    # (names from model_parts). Cost: the same one read of the grads, 16 bytes per param (bench method fused+norms).
    param_norms: bool = False
    # Spike skipping, after OLMo-core's SkipStepOptimizer: skip a step whose total norm x has
    # not (x - mean <= sigma * std) over the norms of the last spike_window *applied* steps (unbiased std; NaN is a
    # spike; nothing is skipped before the window is full). step(loss=...) checks the loss the same way against its
    # own window (steps without loss= neither check nor enter it; pass the same loss on every rank). A skipped step
    # changes nothing, enters no window nor ZClip's statistics, and counts in fused.spike_skipped_steps (apart from
    # skipped_steps). Unlike OLMo-core, the window holds applied steps only and checking waits for a full window.
    skip_spike_sigma: float | None = None
    spike_window: int = 128
    # "zclip": bluorion-com/ZClip's ZClip (mode="zscore", clip_option="adaptive_scaling"). The first zclip_warmup
    # applied norms are collected (clipped by max_grad_norm alone), then an EMA (factor zclip_alpha) of the norm's
    # mean and variance starts from their mean and population variance; with z = (norm - mean) / (std + 1e-6), a norm
    # with z > zclip_z is clipped to mean + zclip_z**2 * std / z, and the EMA takes that threshold (else the norm).
    # With max_grad_norm too, the smaller threshold wins. Unlike ZClip: the norm is float64, skipped steps never
    # reach the statistics, and clip_factor and the "percentile"/"mean" modes are not offered (norm/health.py).
    adaptive_clip: str | None = None
    zclip_alpha: float = 0.97  # ZClip's EMA smoothing factor
    zclip_z: float = 2.5  # ZClip's z-score threshold
    zclip_warmup: int = 25  # norms collected before ZClip's EMA starts
    # Stochastic rounding of the update's bfloat16 stores (torchao's bf16_stochastic_round): "params" rounds bfloat16
    # params, "state" bfloat16 state (compiled_step.bf16_moments), ("params", "state") both; () rounds to nearest, as
    # torch. Unbiased (E[stored] = the float32 result). The random bits are a hash of (stochastic_rounding_seed, the
    # tensor's step count, the element's place, the store): no generator state, no host sync, replayable in a CUDA
    # graph, the same on every rank for replicated params, and a resume continues the same sequence. Adam and AdamW
    # (rules with STOCHASTIC_ROUNDING); raises at the first step where nothing it names is bfloat16.
    stochastic_rounding: tuple[str, ...] | str = ()
    stochastic_rounding_seed: int = 0  # in [0, 2**31)

    def __post_init__(self):
        mgn = self.max_grad_norm
        if mgn is not None:
            if isinstance(mgn, bool) or not isinstance(mgn, numbers.Real):
                raise TypeError(f"max_grad_norm must be a positive number or None, got {type(mgn).__name__}")
            if not math.isfinite(mgn) or mgn <= 0:
                raise ValueError(f"max_grad_norm must be a finite number > 0 or None, got {mgn}")
        nt = self.norm_type
        if isinstance(nt, bool) or not isinstance(nt, numbers.Real):
            raise TypeError(f"norm_type must be a number (1, 2, inf or any p > 0), got {type(nt).__name__}")
        if math.isnan(nt) or nt <= 0:
            raise ValueError(f"norm_type must be > 0 (1, 2, inf or any finite p > 0), got {nt}")
        if isinstance(self.bucket_size, bool) or not isinstance(self.bucket_size, int) or self.bucket_size < 1:
            raise ValueError(f"bucket_size must be an int >= 1, got {self.bucket_size!r}")
        if isinstance(self.pack_threshold, bool) or not isinstance(self.pack_threshold, int) or self.pack_threshold < 0:
            raise ValueError(f"pack_threshold must be an int >= 0, got {self.pack_threshold!r}")
        if self.combo_kernels is not None and not isinstance(self.combo_kernels, bool):
            raise TypeError(f"combo_kernels must be a bool or None, got {type(self.combo_kernels).__name__}")
        for name in ("error_if_nonfinite", "compile", "flat_params", "cuda_graphs", "verbose", "compile_notice",
                     "param_norms"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        _check_health_options(self)
        _check_stochastic_rounding(self)

    @property
    def health(self) -> bool:
        """Whether any training-health option is on (the step then runs the health finish)."""
        return self.param_norms or self.skip_spike_sigma is not None or self.adaptive_clip is not None


ROUNDED_STORES = ("params", "state")  # what stochastic_rounding may name


def _check_stochastic_rounding(config: "FusedStepConfig") -> None:
    """``stochastic_rounding`` as a tuple of names from ``ROUNDED_STORES``; the seed an int in [0, 2**31)."""
    value = config.stochastic_rounding
    names = (value,) if isinstance(value, str) else value
    if not isinstance(names, (tuple, list)) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"stochastic_rounding must be a str or a tuple of str from {ROUNDED_STORES}, got {value!r}")
    wrong = [n for n in names if n not in ROUNDED_STORES]
    if wrong:
        raise ValueError(f"stochastic_rounding names {wrong}: expected some of {ROUNDED_STORES}")
    object.__setattr__(config, "stochastic_rounding", tuple(dict.fromkeys(names)))
    _int_at_least(config.stochastic_rounding_seed, "stochastic_rounding_seed", 0)
    if config.stochastic_rounding_seed >= 2**31:
        raise ValueError(f"stochastic_rounding_seed must be < 2**31, got {config.stochastic_rounding_seed}")


def _real(value, name: str, low: float, high: float | None = None) -> None:
    """A finite real number in the open interval (low, high)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= low or (high is not None and value >= high):
        raise ValueError(f"{name} must be a finite number in ({low}, {'inf' if high is None else high}), got {value}")


def _int_at_least(value, name: str, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def _check_health_options(config: "FusedStepConfig") -> None:
    """The training-health options (``TypeError``/``ValueError``)."""
    if config.skip_spike_sigma is not None:
        _real(config.skip_spike_sigma, "skip_spike_sigma", 0.0)
    _int_at_least(config.spike_window, "spike_window", 2)  # an unbiased std needs two values
    if config.adaptive_clip is not None and config.adaptive_clip != "zclip":
        raise ValueError(f"adaptive_clip must be None or 'zclip', got {config.adaptive_clip!r}")
    _real(config.zclip_alpha, "zclip_alpha", 0.0, 1.0)
    _real(config.zclip_z, "zclip_z", 0.0)
    _int_at_least(config.zclip_warmup, "zclip_warmup", 1)


@dataclass(frozen=True, kw_only=True)
class DistributedConfig:
    """Where the params live across ranks; runtime objects (modules, meshes) go in as they are."""

    # Modules whose params the optimizer holds: param names for messages, expert markers, the FSDP2 modules
    # accumulate() drives, torchao FP8 weights, and DDP modules with gradient_as_bucket_view=True, whose grads are
    # then read in DDP's buckets (lifecycle/ddp.py; Muon's matrices excepted: a copy per step).
    model_parts: tuple = ()
    device_mesh: object = None  # DeviceMesh holding the pipeline axis
    pp_axis_name: str | None = None  # PP is on when given: the norm is reduced over it, PP scaling applies
    moe_mesh: object = None  # DeviceMesh of the MoE params (EP scaling uses its "ep_shard" dim)
    ep_axis_name: str | None = None  # EP axis of moe_mesh: expert DTensors are recognised by it
    expert_tp_replication_factor: int = 1  # expert grads are also divided by this (NeMo Automodel's semantics)

    def __post_init__(self):
        experts.check_replication_factor(self.expert_tp_replication_factor)
        if self.pp_axis_name is not None and self.device_mesh is None:
            raise ValueError("pp_axis_name needs device_mesh (the mesh that has the pipeline axis)")
        if self.ep_axis_name is not None and self.moe_mesh is None:
            raise ValueError("ep_axis_name needs moe_mesh (the mesh that has the expert-parallel axis)")


def split_options(options: dict, config, distributed) -> tuple[FusedStepConfig, DistributedConfig]:
    """Build both configs from keyword options, or take the given objects; refuse mixing and unknowns."""
    step_names = {f.name for f in fields(FusedStepConfig)}
    dist_names = {f.name for f in fields(DistributedConfig)}
    unknown = sorted(set(options) - step_names - dist_names)
    if unknown:
        raise TypeError(f"FusedStep got unexpected keyword argument(s) {', '.join(unknown)}")
    step_options = {k: v for k, v in options.items() if k in step_names}
    dist_options = {k: v for k, v in options.items() if k in dist_names}
    if config is not None and step_options:
        raise TypeError(f"pass either config= or its options as keywords, not both ({', '.join(step_options)})")
    if distributed is not None and dist_options:
        raise TypeError(f"pass either distributed= or its options as keywords, not both ({', '.join(dist_options)})")
    if config is not None and not isinstance(config, FusedStepConfig):
        raise TypeError(f"config must be a FusedStepConfig, got {type(config).__name__}")
    if distributed is not None and not isinstance(distributed, DistributedConfig):
        raise TypeError(f"distributed must be a DistributedConfig, got {type(distributed).__name__}")
    if "model_parts" in dist_options:
        parts = dist_options["model_parts"]
        dist_options["model_parts"] = (parts,) if hasattr(parts, "named_parameters") else tuple(parts or ())
    return config or FusedStepConfig(**step_options), distributed or DistributedConfig(**dist_options)
