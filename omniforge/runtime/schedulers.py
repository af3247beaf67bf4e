"""Diffusion schedulers in numpy: DDIM, Euler discrete and DPM-Solver++ (multistep).

Configured from a diffusers ``scheduler_config.json`` (the build's ``configs/<m>_scheduler.json``)
and checked step by step against diffusers' own schedulers in the tests. Written here because
the runtime must not import torch; only the options those configs use are implemented, and any
other value raises ``ConfigError`` rather than silently computing something different.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from omniforge.errors import ConfigError


@dataclass(frozen=True)
class SchedulerConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    set_alpha_to_one: bool = True
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    # The exporter stores the table diffusers computed (torch float32), so the numpy schedulers
    # use bit-identical alphas; without it the table is computed here in float64.
    alphas_cumprod: tuple[float, ...] = ()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SchedulerConfig:
        """The config of a diffusers ``scheduler_config.json``, every value the numpy schedulers
        read checked for its type and range (one ``ConfigError`` naming the key and the limit)."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"the scheduler config must be a JSON object, got {type(d).__name__}")
        for key, ok in (
            ("thresholding", False),
            ("rescale_betas_zero_snr", False),
            ("use_karras_sigmas", False),
            ("trained_betas", None),
        ):
            if d.get(key, ok) is not ok:
                raise ConfigError(
                    f"scheduler option {key}={_shown(d[key])} is not supported by the numpy schedulers"
                )
        kind = d.get("_class_name", "Scheduler")
        if not isinstance(kind, str) or not kind.endswith("Scheduler"):
            raise ConfigError(
                f"the scheduler config is not a scheduler's (its _class_name is {_shown(kind)})"
            )
        base = cls()
        n = _int(d, "num_train_timesteps", base.num_train_timesteps, 1, MAX_TRAIN_TIMESTEPS)
        beta_start = _float(d, "beta_start", base.beta_start)
        beta_end = _float(d, "beta_end", base.beta_end)
        if not 0 < beta_start <= beta_end < 1:
            raise ConfigError(
                f"the scheduler config's betas must satisfy 0 < beta_start <= beta_end < 1, "
                f"got beta_start={beta_start!r}, beta_end={beta_end!r}"
            )
        cfg = cls(
            num_train_timesteps=n,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=_choice(d, "beta_schedule", base.beta_schedule, ("linear", "scaled_linear")),
            prediction_type=_choice(d, "prediction_type", base.prediction_type, ("epsilon", "v_prediction")),
            timestep_spacing=_choice(
                d, "timestep_spacing", base.timestep_spacing, ("leading", "trailing", "linspace")
            ),
            steps_offset=_int(d, "steps_offset", base.steps_offset, 0, n - 1),
            set_alpha_to_one=_bool(d, "set_alpha_to_one", base.set_alpha_to_one),
            clip_sample=_bool(d, "clip_sample", base.clip_sample),
            clip_sample_range=_float(d, "clip_sample_range", base.clip_sample_range),
            alphas_cumprod=_alphas_cumprod(d.get("alphas_cumprod", ()), n),
        )
        if cfg.clip_sample_range <= 0:
            raise ConfigError(
                f"the scheduler config's 'clip_sample_range' must be > 0, got {cfg.clip_sample_range!r}"
            )
        _check_table(cfg.alphas_cumprod_table(), "given" if cfg.alphas_cumprod else "computed from its betas")
        return cfg

    def alphas_cumprod_table(self) -> np.ndarray:
        if self.alphas_cumprod:
            return np.asarray(self.alphas_cumprod, dtype=np.float32)
        n = self.num_train_timesteps
        if self.beta_schedule == "linear":
            betas = np.linspace(self.beta_start, self.beta_end, n, dtype=np.float64)
        else:
            betas = np.linspace(self.beta_start**0.5, self.beta_end**0.5, n, dtype=np.float64) ** 2
        return np.cumprod(1.0 - betas).astype(np.float32)


MAX_TRAIN_TIMESTEPS = 10_000  # a scheduler config's num_train_timesteps (diffusers' configs use 1000)
MIN_ALPHA_CUMPROD = 1e-20  # the schedulers' sigmas (up to 1e10) and their squares stay finite in float32


def _shown(v: object) -> str:
    """A config value as a message shows it: cut short."""
    r = repr(v)
    return r if len(r) <= 60 else f"{r[:40]}...({len(r)} characters)"


def _int(d: Mapping[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    v = d.get(key, default)
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ConfigError(
            f"the scheduler config's '{key}' must be an integer in [{lo}, {hi}], got {_shown(v)}"
        )
    return v


def _float(d: Mapping[str, Any], key: str, default: float) -> float:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ConfigError(f"the scheduler config's '{key}' must be a finite number, got {_shown(v)}")
    return float(v)


def _bool(d: Mapping[str, Any], key: str, default: bool) -> bool:
    v = d.get(key, default)
    if not isinstance(v, bool):
        raise ConfigError(f"the scheduler config's '{key}' must be true or false, got {_shown(v)}")
    return v


def _choice(d: Mapping[str, Any], key: str, default: str, choices: tuple[str, ...]) -> str:
    v = d.get(key, default)
    if not isinstance(v, str) or v not in choices:
        raise ConfigError(f"{key} {_shown(v)} is not supported ({', '.join(choices)})")
    return v


def _alphas_cumprod(v: object, n: int) -> tuple[float, ...]:
    """The stored alphas_cumprod table: empty, or ``n`` numbers (their range is checked as float32)."""
    if isinstance(v, (str, bytes)) or not isinstance(v, Sequence):
        raise ConfigError(
            f"the scheduler config's 'alphas_cumprod' must be a list of numbers, got {_shown(v)}"
        )
    if not v:
        return ()
    if len(v) != n:
        raise ConfigError(
            f"the scheduler's alphas_cumprod table has {len(v)} entries, not num_train_timesteps ({n})"
        )
    if any(isinstance(a, bool) or not isinstance(a, (int, float)) for a in v):
        raise ConfigError("the scheduler config's 'alphas_cumprod' must hold only numbers")
    return tuple(float(a) for a in v)


def _check_table(table: np.ndarray, how: str) -> None:
    """The float32 alphas_cumprod table the schedulers divide by, take roots and logs of: every
    value in [``MIN_ALPHA_CUMPROD``, 1) and strictly decreasing (a zero-length step is a division
    by zero in DPM-Solver), else one ``ConfigError``."""
    ok = np.isfinite(table).all() and table.min() >= MIN_ALPHA_CUMPROD and table.max() < 1
    if not ok:
        finite = table[np.isfinite(table)]
        got = f"{float(finite.min()):.3g} to {float(finite.max()):.3g}" if finite.size else "no finite values"
        raise ConfigError(
            f"the scheduler's alphas_cumprod table ({how}) must hold numbers in [{MIN_ALPHA_CUMPROD:g}, 1) "
            f"in float32, got {got}"
        )
    if (np.diff(table) >= 0).any():
        raise ConfigError(
            f"the scheduler's alphas_cumprod table ({how}) must decrease strictly with the timestep "
            "in float32"
        )


class Scheduler:
    """Common interface: ``set_timesteps``, ``scale_model_input``, ``step``, ``init_noise_sigma``."""

    name = "base"

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.alphas_cumprod = config.alphas_cumprod_table()
        self.timesteps = np.zeros(0)
        self.init_noise_sigma = 1.0

    def set_timesteps(self, num_steps: int) -> None:
        raise NotImplementedError

    def scale_model_input(self, sample: np.ndarray, step_index: int) -> np.ndarray:
        return sample

    def step(self, model_output: np.ndarray, step_index: int, sample: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @classmethod
    def schedule(cls, config: SchedulerConfig, num_steps: int) -> np.ndarray:
        """The timesteps ``num_steps`` steps visit, highest first (not yet checked)."""
        raise NotImplementedError

    @property
    def max_steps(self) -> int:
        """The most steps this scheduler can take over the config's training timesteps."""
        c = self.config
        return _max_steps(type(self), c.num_train_timesteps, c.timestep_spacing, c.steps_offset)

    def check_steps(self, num_steps: int) -> None:
        """Refuse a step count outside [1, max_steps] with one sentence."""
        top = self.max_steps
        c = self.config
        if top < 1:
            raise ConfigError(
                f"the build's scheduler config leaves the {self.name} scheduler no usable step count "
                f"(steps_offset {c.steps_offset} over {c.num_train_timesteps} training timesteps)"
            )
        whole = isinstance(num_steps, int | np.integer) and not isinstance(num_steps, bool)
        if not (whole and 1 <= num_steps <= top):
            raise ConfigError(
                f"steps must lie in [1, {top}] for the {self.name} scheduler over "
                f"{c.num_train_timesteps} training timesteps, got {num_steps!r}"
            )


def _spaced(c: SchedulerConfig, num_steps: int) -> np.ndarray:
    """diffusers' integer timestep spacings (DDIM; Euler except ``linspace``)."""
    n = c.num_train_timesteps
    if c.timestep_spacing == "leading":
        ratio = n // num_steps
        return (np.arange(0, num_steps) * ratio).round()[::-1].astype(np.int64) + c.steps_offset
    if c.timestep_spacing == "trailing":
        return _trailing(n, num_steps)
    return np.linspace(0, n - 1, num_steps).round()[::-1].astype(np.int64)


def _trailing(n: int, num_steps: int) -> np.ndarray:
    # diffusers' np.arange(n, 0, -n / num_steps) yields one step too many for some counts (61 of
    # 1000, ...) through float error; its first num_steps values are exactly these
    return (np.round(n - np.arange(num_steps) * (n / num_steps)) - 1).astype(np.int64)


def _usable(timesteps: np.ndarray, num_steps: int, n: int) -> bool:
    """One timestep per step, each a trained one, strictly decreasing (no zero-length step)."""
    return (
        len(timesteps) == num_steps
        and float(timesteps.min()) >= 0
        and float(timesteps.max()) <= n - 1
        and bool(np.all(np.diff(timesteps) < 0))
    )


@lru_cache(maxsize=64)
def _max_steps(cls: type[Scheduler], n: int, spacing: str, offset: int) -> int:
    """The largest count such that every count from 1 up to it gives a usable schedule."""
    c = SchedulerConfig(num_train_timesteps=n, timestep_spacing=spacing, steps_offset=offset)
    top = 0
    while top < n and _usable(cls.schedule(c, top + 1), top + 1, n):
        top += 1
    return top


class DDIMScheduler(Scheduler):
    """Deterministic DDIM (eta = 0)."""

    name = "ddim"

    @classmethod
    def schedule(cls, config: SchedulerConfig, num_steps: int) -> np.ndarray:
        return _spaced(config, num_steps)

    def set_timesteps(self, num_steps: int) -> None:
        self.check_steps(num_steps)
        self.num_steps = num_steps
        self.timesteps = self.schedule(self.config, num_steps)

    def step(self, model_output: np.ndarray, step_index: int, sample: np.ndarray) -> np.ndarray:
        c = self.config
        t = int(self.timesteps[step_index])
        prev_t = t - c.num_train_timesteps // self.num_steps
        a_t = float(self.alphas_cumprod[t])
        final = 1.0 if c.set_alpha_to_one else float(self.alphas_cumprod[0])
        a_prev = float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else final
        b_t = 1.0 - a_t
        if c.prediction_type == "epsilon":
            x0 = (sample - b_t**0.5 * model_output) / a_t**0.5
            eps = model_output
        else:  # v_prediction
            x0 = a_t**0.5 * sample - b_t**0.5 * model_output
            eps = a_t**0.5 * model_output + b_t**0.5 * sample
        if c.clip_sample:
            x0 = np.clip(x0, -c.clip_sample_range, c.clip_sample_range)
        return (a_prev**0.5 * x0 + (1.0 - a_prev) ** 0.5 * eps).astype(np.float32)


class EulerDiscreteScheduler(Scheduler):
    """Euler (no churn) over the interpolated sigma schedule."""

    name = "euler"

    @classmethod
    def schedule(cls, config: SchedulerConfig, num_steps: int) -> np.ndarray:
        if config.timestep_spacing == "linspace":
            return np.linspace(0, config.num_train_timesteps - 1, num_steps, dtype=np.float64)[::-1].copy()
        return _spaced(config, num_steps).astype(np.float64)

    def set_timesteps(self, num_steps: int) -> None:
        self.check_steps(num_steps)
        c = self.config
        ts = self.schedule(c, num_steps)
        full = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5  # float32, as diffusers
        sigmas = np.interp(ts, np.arange(len(full)), full).astype(np.float32)
        self.sigmas = np.concatenate([sigmas, np.zeros(1, np.float32)])
        self.timesteps = ts.astype(np.float32)
        smax = float(self.sigmas.max())
        self.init_noise_sigma = (
            smax if c.timestep_spacing in ("linspace", "trailing") else (smax**2 + 1) ** 0.5
        )

    def scale_model_input(self, sample: np.ndarray, step_index: int) -> np.ndarray:
        sigma = self.sigmas[step_index]  # float32 scalar arithmetic throughout, as diffusers
        return (sample / (sigma**2 + np.float32(1)) ** np.float32(0.5)).astype(np.float32)

    def step(self, model_output: np.ndarray, step_index: int, sample: np.ndarray) -> np.ndarray:
        sigma, nxt = self.sigmas[step_index], self.sigmas[step_index + 1]
        one = np.float32(1)
        if self.config.prediction_type == "epsilon":
            x0 = sample - sigma * model_output
        else:
            x0 = model_output * (-sigma / (sigma**2 + one) ** np.float32(0.5)) + sample / (sigma**2 + one)
        derivative = (sample - x0) / sigma
        return (sample + derivative * (nxt - sigma)).astype(np.float32)


class DPMSolverMultistepScheduler(Scheduler):
    """DPM-Solver++ of order 2 (midpoint), lower order at the end, final sigma zero."""

    name = "dpm"
    order = 2

    @classmethod
    def schedule(cls, config: SchedulerConfig, num_steps: int) -> np.ndarray:
        n = config.num_train_timesteps
        if config.timestep_spacing == "linspace":
            return np.linspace(0, n - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)
        if config.timestep_spacing == "leading":
            ratio = n // (num_steps + 1)
            ts = (np.arange(0, num_steps + 1) * ratio).round()[::-1][:-1].astype(np.int64)
            return ts + config.steps_offset
        return _trailing(n, num_steps)

    def set_timesteps(self, num_steps: int) -> None:
        self.check_steps(num_steps)
        ts = self.schedule(self.config, num_steps)
        full = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5  # float32, as diffusers
        sigmas = np.interp(ts, np.arange(len(full)), full).astype(np.float32)
        self.sigmas = np.concatenate([sigmas, np.zeros(1, np.float32)])
        self.timesteps = ts
        self._outputs: list[np.ndarray | None] = [None] * self.order
        self._lower_order_nums = 0

    @staticmethod
    def _alpha_sigma(sigma: float) -> tuple[float, float]:
        alpha = 1.0 / (sigma**2 + 1) ** 0.5
        return alpha, sigma * alpha

    @staticmethod
    def _lambda(alpha: float, sigma: float) -> float:
        with np.errstate(divide="ignore"):
            return float(np.log(np.float32(alpha)) - np.log(np.float32(sigma)))

    def step(self, model_output: np.ndarray, step_index: int, sample: np.ndarray) -> np.ndarray:
        n = len(self.timesteps)
        final = step_index == n - 1  # final sigma is zero: always first order there
        second_last = step_index == n - 2 and n < 15
        alpha_s, sigma_s = self._alpha_sigma(float(self.sigmas[step_index]))
        if self.config.prediction_type == "epsilon":
            x0 = (sample - sigma_s * model_output) / alpha_s
        else:
            x0 = alpha_s * sample - sigma_s * model_output
        self._outputs = [*self._outputs[1:], x0]
        alpha_t, sigma_t = self._alpha_sigma(float(self.sigmas[step_index + 1]))
        lam_t, lam_s0 = self._lambda(alpha_t, sigma_t), self._lambda(alpha_s, sigma_s)
        h = lam_t - lam_s0
        expm = np.exp(-h) - 1.0
        if self._lower_order_nums < 1 or final:
            prev = (sigma_t / sigma_s) * sample - alpha_t * expm * x0
        else:
            del second_last  # order 2 is the highest implemented, so the second-to-last step is the same
            m0, m1 = self._outputs[-1], self._outputs[-2]
            assert m1 is not None
            alpha_s1, sigma_s1 = self._alpha_sigma(float(self.sigmas[step_index - 1]))
            r0 = (lam_s0 - self._lambda(alpha_s1, sigma_s1)) / h
            d1 = (1.0 / r0) * (m0 - m1)
            prev = (sigma_t / sigma_s) * sample - alpha_t * expm * m0 - 0.5 * alpha_t * expm * d1
        if self._lower_order_nums < self.order:
            self._lower_order_nums += 1
        return np.asarray(prev, dtype=np.float32)


SCHEDULERS: dict[str, type[Scheduler]] = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "dpm": DPMSolverMultistepScheduler,
}


def make_scheduler(name: str, config: dict[str, Any]) -> Scheduler:
    """A scheduler by name (ddim, euler, dpm) over a diffusers scheduler config."""
    if name not in SCHEDULERS:
        raise ConfigError(f"unknown scheduler '{name}' (choose from {', '.join(SCHEDULERS)})")
    return SCHEDULERS[name](SchedulerConfig.from_dict(config))
