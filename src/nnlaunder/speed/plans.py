"""How Neural Cleanse runs on the machine at hand: precision, memory format, the first conv's
input-gradient path and classes per forward pass, chosen by timing (`NCConfig.tune`, on in the
fast preset).

bfloat16 pays on a CPU with AMX and on most GPUs; on a CPU with AVX512-BF16 but no AMX it can be
slower than fp32, and which memory format and chunk size win depends on the model. So a tuned run
times one optimisation step of each candidate plan on the caller's own model and images (about a
second on a small CNN, a few on ResNet-20), and keeps the fastest, with two rules:
- bfloat16 only where the configuration allows it (`amp`), the hardware has it, and it measured
  at least `BF16_MARGIN` faster than the best fp32 plan: never bf16 where it is slower;
- the choice is cached per (machine, model architecture, image shape, batch size) in
  `$NNLAUNDER_CACHE/nc-plans.json` (default `~/.cache/nnlaunder`; `NNLAUNDER_CACHE=off` turns the
  cache off), so a machine times each model once and later runs take the same plan.
Every plan computes the same function; they differ in rounding (bf16 much more than the others).
The plan used is recorded in each result (`NCResult.plan`, a laundering round's `nc_plan`).

This module holds the plan, the choice rule and the cache; the timing itself is Neural Cleanse's
own step, passed in by `neural_cleanse.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..device import cache_dir, cpu_flags, cpu_name

BF16_MARGIN = 0.9          # bf16 must take at most this share of the best fp32 plan's step time
CACHE_VERSION = 3          # 2: plans also choose the one-channel conv's forward; 3: and the fused conv-pool kernel


@dataclass(frozen=True)
class Plan:
    amp: bool                  # bfloat16 autocast for the model's forward/backward
    channels_last: bool        # weights and stamped images channels-last
    input_grad: str            # "matmul" | "native": a few-channel first conv's input gradient
    class_chunk: int | None    # classes per forward and backward pass (None: all at once)
    tuned: bool = False        # chosen by timing (False: taken from the configuration as it is)
    im2col_forward: bool = True  # with input_grad "matmul": a one-channel conv's fp32 CPU forward as
    #                              im2col + matmul (faster on some CPUs, slower on others)
    fused_conv_pool: bool = False  # first conv -> max-pool -> ReLU runs by the native kernel (kernels.FusedConvPool)

    def record(self) -> dict:
        """What a result records of the plan."""
        return {"precision": "bf16" if self.amp else "fp32",
                "memory_format": "channels_last" if self.channels_last else "contiguous",
                "input_grad": self.input_grad, "class_chunk": self.class_chunk, "tuned": self.tuned,
                "im2col_forward": self.im2col_forward, "fused_conv_pool": self.fused_conv_pool}


StepTimer = Callable[[Plan, int], float]     # (plan, classes per step) -> seconds of one step


def machine(device: torch.device) -> dict:
    """The facts a timing depends on, recorded with every tuned plan and benchmark row."""
    if device.type == "cuda":
        return {"device": torch.cuda.get_device_name(device), "torch": torch.__version__}
    return {"device": cpu_name(), "flags": cpu_flags(), "threads": torch.get_num_threads(),
            "torch": torch.__version__}


def model_signature(model: nn.Module) -> str:
    """The architecture without the weights: module types and parameter shapes."""
    parts = [f"{name}:{type(m).__name__}" for name, m in model.named_modules()]
    parts += [f"{name}:{tuple(p.shape)}" for name, p in model.named_parameters()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def cache_file() -> Path | None:
    base = cache_dir()
    return None if base is None else base / "nc-plans.json"


def _read_cache(path: Path | None) -> dict:
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}                       # a damaged cache is timed again, never trusted
    return data if isinstance(data, dict) and data.get("version") == CACHE_VERSION else {}


def _write_cache(path: Path | None, key: str, entry: dict) -> None:
    if path is None:
        return
    data = _read_cache(path) or {"version": CACHE_VERSION, "plans": {}}
    data.setdefault("plans", {})[key] = entry
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(OSError):  # an unwritable cache only costs the timing next time
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)


def _from_entry(entry: dict) -> Plan | None:
    try:
        p = Plan(**{**entry["plan"], "tuned": True})
    except (KeyError, TypeError):
        return None
    ok = (isinstance(p.amp, bool) and isinstance(p.channels_last, bool) and p.input_grad in ("matmul", "native")
          and isinstance(p.im2col_forward, bool) and isinstance(p.fused_conv_pool, bool)
          and (p.class_chunk is None or (isinstance(p.class_chunk, int) and p.class_chunk >= 1)))
    return p if ok else None


def pick(timings: dict[Plan, float]) -> Plan:
    """The fastest plan, bf16 only where it beats the best fp32 plan by the margin."""
    fp32 = {p: t for p, t in timings.items() if not p.amp}
    bf16 = {p: t for p, t in timings.items() if p.amp}
    best32 = min(fp32, key=fp32.__getitem__) if fp32 else None
    best16 = min(bf16, key=bf16.__getitem__) if bf16 else None
    if best16 is not None and (best32 is None or timings[best16] <= BF16_MARGIN * timings[best32]):
        return best16
    assert best32 is not None, "no fp32 candidate"
    return best32


def candidates(default: Plan, bf16_ok: bool, cl_ok: bool = True) -> list[Plan]:
    """Stage 1: precision x memory format (channels-last only where the model takes it), at the configured
    input-gradient path and the default chunk."""
    return [dataclasses.replace(default, amp=amp, channels_last=cl, tuned=True)
            for amp in ((False, True) if bf16_ok else (False,)) for cl in ((False, True) if cl_ok else (False,))]


def _stage(plans: list[Plan], step_seconds: StepTimer, per: int) -> dict[Plan, float]:
    return {p: step_seconds(p, per) / per for p in plans}


def tuned_plan(default: Plan, key: dict, step_seconds: StepTimer, n_classes: int, bf16_ok: bool,
               few_channel_conv: bool, on_cpu: bool, one_channel_conv: bool = False,
               fusable: bool = False, cl_ok: bool = True) -> tuple[Plan, dict]:
    """The cached plan for `key`, or the fastest by `step_seconds`; returns (plan, what was timed)."""
    path = cache_file()
    k = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    hit = _read_cache(path).get("plans", {}).get(k)
    plan = _from_entry(hit) if hit else None
    if plan is not None and (bf16_ok or not plan.amp) and (fusable or not plan.fused_conv_pool) and (
            cl_ok or not plan.channels_last):
        return plan, {"cached": True}
    per = min(4, n_classes) if on_cpu else n_classes    # two forward passes of the default chunk on a CPU
    measured = _stage(candidates(default, bf16_ok, cl_ok), step_seconds, per)
    best = pick(measured)
    timed = {"stage1": [{**p.record(), "s_per_class_step": t} for p, t in measured.items()]}
    later = []                          # (name, alternatives to the best so far, margin they must beat)
    if few_channel_conv:                # the first conv's input-gradient path (and fp32 one-channel forward)
        later.append(("stage2", lambda b: [dataclasses.replace(
            b, input_grad="native" if b.input_grad == "matmul" else "matmul")] + (
            [dataclasses.replace(b, im2col_forward=not b.im2col_forward)]
            if one_channel_conv and on_cpu and not b.amp and b.input_grad == "matmul" else []), 1.0))
    if fusable:                         # the native conv-pool kernel (on in `default` where allowed): vs without
        later.append(("stage_fused", lambda b: [dataclasses.replace(b, fused_conv_pool=not b.fused_conv_pool)], 1.0))
    if on_cpu and n_classes > 2:        # classes per forward pass: another chunk must win by 10%
        later.append(("stage3", lambda b: [dataclasses.replace(b, class_chunk=c) for c in (1, 4)], 0.9))
    for name, alternatives, margin in later:
        alts = [a for a in alternatives(best) if a != best]
        measured.update(_stage(alts, step_seconds, per))
        stage = {p: measured[p] for p in [best, *alts]}
        fastest = min(stage, key=stage.__getitem__)
        best = fastest if stage[fastest] <= margin * stage[best] else best
        timed[name] = [{**p.record(), "s_per_class_step": t} for p, t in stage.items()]
    _write_cache(path, k, {"key": key, "plan": {f.name: getattr(best, f.name) for f in dataclasses.fields(Plan)
                                                 if f.name != "tuned"}, "timed": timed})
    return best, {"cached": False, **timed}
