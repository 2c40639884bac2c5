"""The attacks, one registry shared by the CLI, experiment files and benchmarks.

Every entry runs as `spec.run(model, clean, cfg, hooks) -> AttackResult`. `hooks` carries what a
caller measures after each round and where a multi-round attack keeps its state; a one-shot attack
calls `hooks.on_round(1, model, info)` once at its end. A new attack is one file with a config
dataclass and a function `attack(model, clean, cfg) -> AttackResult`, plus one line below.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..config import from_dict, with_seed
from ..data import Dataset
from ..errors import UserError
from .anp import ANPConfig, anp
from .base import AttackResult
from .baselines import (
    ATTACKER_FINETUNE,
    FinePruneConfig,
    FinetuneConfig,
    PruneConfig,
    UnlearnConfig,
    fine_prune,
    finetune,
    nc_unlearn,
    prune,
)
from .dehydration import DehydrationConfig, dehydration
from .ibau import IBAUConfig, ibau
from .laundering import OnProgress, config_from_params, launder_config
from .nad import NADConfig, nad
from .weight_noise import WeightNoiseConfig, weight_noise


@dataclass
class Hooks:
    on_round: Callable[[int, nn.Module, Any], dict[str, Any]] | None = None   # measure after each round
    state_file: Path | None = None              # a multi-round attack's state, resumed when present
    extra: Callable[[], dict[str, Any]] | None = None            # the caller's data kept with that state
    on_resume: Callable[[dict[str, Any]], None] | None = None    # ... handed back on resume
    on_state: Callable[[Any, Any], None] | None = None           # after each round: (state, round's NC)
    on_progress: OnProgress | None = None
    calibrate: Any = None                       # laundering: CalibrateOptions, chosen on the attacker's set first
    first_nc: Any = None                        # laundering, NC unlearning: round 1's Neural Cleanse, already run
    on_nc: Callable[[Any], None] | None = None  # NC unlearning: the Neural Cleanse it just ran, for the caller


@dataclass
class OneShot:
    """The round record of a one-shot attack, as `hooks.on_round` sees it."""
    seconds: float
    nc_seconds: float | None = None             # the Neural Cleanse it used (run, or kept from another cell)


def one_shot(fn: Callable[[nn.Module, Dataset, Any], AttackResult]) -> Callable[..., AttackResult]:
    def run(model: nn.Module, clean: Dataset, cfg: Any, hooks: Hooks | None = None) -> AttackResult:
        res = fn(model, clean, cfg)
        if hooks is not None and hooks.on_round is not None:
            res.info["metrics"] = hooks.on_round(1, res.model, OneShot(res.seconds, res.info.get("nc_seconds")))
        return res
    return run


def _nc_unlearn(model: nn.Module, clean: Dataset, cfg: Any, hooks: Hooks | None = None) -> AttackResult:
    """NC unlearning with the Neural Cleanse a workspace kept for the same model, images and settings."""
    h = hooks or Hooks()
    return one_shot(lambda m, c, k: nc_unlearn(m, c, k, nc=h.first_nc, keep=h.on_nc))(model, clean, cfg, hooks)


def _launder(model: nn.Module, clean: Dataset, cfg: Any, hooks: Hooks | None = None) -> AttackResult:
    from .pipeline import run_launder

    h = hooks or Hooks()
    run = run_launder(model, clean, cfg, evaluate=h.on_round, state_file=h.state_file, resume=True, extra=h.extra,
                      on_resume=h.on_resume, on_state=h.on_state, on_progress=h.on_progress, calibrate=h.calibrate,
                      first_nc=h.first_nc)
    return AttackResult(run.result.model, {"rounds": run.report["rounds"], "calibration": run.calibration},
                        run.result.seconds)


def _one_round(name: str, default: Callable[[], Any]) -> Callable[[dict[str, Any], str, int, int], Any]:
    """How an experiment cell configures a one-shot attack: `attack_params` over the default's fields."""
    def configure(params: dict[str, Any], variant: str, rounds: int, seed: int) -> Any:
        if rounds != 1:
            raise UserError(f"rounds: only laundering has rounds; {name} runs once")
        base = default()
        if params:
            current = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
            base = from_dict(type(base), {**current, **params}, "attack_params")
        return with_seed(base, seed, params)         # the cell's seed seeds the attack's own draws
    return configure


@dataclass(frozen=True)
class AttackSpec:
    run: Callable[..., AttackResult]
    default: Callable[[], Any]
    summary: str
    configure: Callable[[dict[str, Any], str, int, int], Any] | None = None   # None: one round, default's fields


def _spec(fn: Callable[[nn.Module, Dataset, Any], AttackResult], default: Callable[[], Any], summary: str
          ) -> AttackSpec:
    return AttackSpec(one_shot(fn), default, summary)


ATTACKS: dict[str, AttackSpec] = {
    "launder": AttackSpec(_launder, lambda: launder_config("strong"), "Neural Network Laundering",
                          lambda params, variant, rounds, seed: config_from_params(params, variant, rounds, seed)),
    "prune": _spec(prune, lambda: PruneConfig(0.9), "90% magnitude pruning per layer"),
    "prune-ft": _spec(prune, lambda: PruneConfig(0.9, ATTACKER_FINETUNE), "90% magnitude pruning, then fine-tuning"),
    "ftll": _spec(finetune, lambda: FinetuneConfig("ftll"), "fine-tune the last layer"),
    "ftal": _spec(finetune, lambda: FinetuneConfig("ftal"), "fine-tune all layers"),
    "rtll": _spec(finetune, lambda: FinetuneConfig("rtll"), "re-initialise and train the last layer"),
    "rtal": _spec(finetune, lambda: FinetuneConfig("rtal"), "re-initialise the last layer, train all"),
    "fine-prune": _spec(fine_prune, FinePruneConfig, "Liu et al.'s fine-pruning"),
    "nc-unlearn": AttackSpec(_nc_unlearn, UnlearnConfig, "Neural Cleanse unlearning (no reset)"),
    "weight-noise": _spec(weight_noise, WeightNoiseConfig, "Gaussian noise on every weight (0.1 x layer std)"),
    "nad": _spec(nad, NADConfig, "Neural Attention Distillation (Li et al. 2021)"),
    "anp": _spec(anp, ANPConfig, "Adversarial Neuron Pruning (Wu & Wang 2021)"),
    "i-bau": _spec(ibau, IBAUConfig, "Implicit Backdoor Adversarial Unlearning (Zeng et al. 2022)"),
    "dehydration": _spec(dehydration, DehydrationConfig,
                         "Neural Dehydration: recover every class, unlearn (Lu et al. 2024)"),
}


def attack_spec(name: str) -> AttackSpec:
    if name not in ATTACKS:
        raise UserError(f"unknown attack {name!r}; choose from {', '.join(ATTACKS)}")
    return ATTACKS[name]


def configure(name: str, params: dict[str, Any], variant: str = "strong", rounds: int = 1, seed: int = 0) -> Any:
    """The config an experiment cell's `attack`, `attack_params`, `variant`, `rounds` and `seed` ask for."""
    spec = attack_spec(name)
    how = spec.configure or _one_round(name, spec.default)
    return how(params, variant, rounds, seed)


def run_attack(name: str, model: nn.Module, clean: Dataset, cfg: Any = None, hooks: Hooks | None = None,
               **overrides: Any) -> AttackResult:
    spec = attack_spec(name)
    cfg = cfg if cfg is not None else spec.default()
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    return spec.run(model, clean, cfg, hooks)
