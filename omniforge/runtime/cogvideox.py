"""CogVideoX's schedulers in numpy and its denoising loop over a build's engines (torch-free).

``CogVideoXDDIMScheduler`` (deterministic DDIM over an SNR-shifted schedule) and
``CogVideoXDPMScheduler`` (stochastic DPM-Solver++ 2M) as diffusers computes them, checked step by
step against diffusers in the tests; the loop is ``CogVideoXPipeline``'s: classifier-free guidance
with the unconditional and conditional branches in one batch, latents (B, F, C, h, w), the VAE fed
(B, C, F, h, w) divided by its scaling factor. Options diffusers' classes take but this module does
not implement are refused with one sentence.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from omniforge.errors import ConfigError

if TYPE_CHECKING:
    from omniforge.runtime.pipeline import DiffusionConfig, Pipeline

CLASSES = {"CogVideoXDDIMScheduler": "ddim", "CogVideoXDPMScheduler": "dpm"}
PREDICTIONS = ("epsilon", "v_prediction", "sample")
Noise = Callable[[tuple[int, ...]], np.ndarray]


@dataclass(frozen=True)
class CogVideoXSchedulerConfig:
    """The options of a CogVideoX scheduler config that change its arithmetic."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    set_alpha_to_one: bool = True
    rescale_betas_zero_snr: bool = False
    snr_shift_scale: float = 3.0
    alphas_cumprod: tuple[float, ...] = ()  # the table diffusers computed (stored at export)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CogVideoXSchedulerConfig:
        if not isinstance(d, Mapping) or d.get("_class_name") not in CLASSES:
            got = d.get("_class_name") if isinstance(d, Mapping) else type(d).__name__
            raise ConfigError(f"the video scheduler config is not a CogVideoX scheduler's (got {got!r})")
        if d.get("trained_betas") is not None or d.get("thresholding"):
            raise ConfigError("CogVideoX scheduler options trained_betas and thresholding are not supported")
        base = cls()
        n = d.get("num_train_timesteps", base.num_train_timesteps)
        if isinstance(n, bool) or not isinstance(n, int) or not 2 <= n <= 10_000:
            raise ConfigError(
                f"the scheduler config's 'num_train_timesteps' must be an integer in [2, 10000], got {n!r}"
            )

        def pick(key: str, choices: tuple[str, ...]) -> str:
            v = d.get(key, getattr(base, key))
            if v not in choices:
                raise ConfigError(f"CogVideoX scheduler {key} {v!r} is not supported ({', '.join(choices)})")
            return str(v)

        def number(key: str) -> float:
            v = d.get(key, getattr(base, key))
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"the scheduler config's '{key}' must be a finite number, got {v!r}")
            return float(v)

        def flag(key: str) -> bool:
            v = d.get(key, getattr(base, key))
            if not isinstance(v, bool):
                raise ConfigError(f"the scheduler config's '{key}' must be true or false, got {v!r}")
            return v

        offset = d.get("steps_offset", 0)
        if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < n:
            raise ConfigError(
                f"the scheduler config's 'steps_offset' must be an integer in [0, {n - 1}], got {offset!r}"
            )
        table = d.get("alphas_cumprod", ())
        if not isinstance(table, Sequence) or (table and len(table) != n):
            raise ConfigError(
                f"the scheduler's alphas_cumprod table must hold num_train_timesteps ({n}) numbers"
            )
        cfg = cls(
            num_train_timesteps=n,
            beta_start=number("beta_start"),
            beta_end=number("beta_end"),
            beta_schedule=pick("beta_schedule", ("linear", "scaled_linear")),
            prediction_type=pick("prediction_type", PREDICTIONS),
            timestep_spacing=pick("timestep_spacing", ("leading", "trailing", "linspace")),
            steps_offset=offset,
            set_alpha_to_one=flag("set_alpha_to_one"),
            rescale_betas_zero_snr=flag("rescale_betas_zero_snr"),
            snr_shift_scale=number("snr_shift_scale"),
            alphas_cumprod=tuple(float(a) for a in table),
        )
        t = cfg.table()
        if not (np.isfinite(t).all() and t.min() >= 0 and t.max() < 1 and (np.diff(t) < 0).all()):
            raise ConfigError(
                "the CogVideoX scheduler's alphas_cumprod table must decrease strictly within [0, 1)"
            )
        if cfg.prediction_type == "epsilon" and t.min() == 0:
            raise ConfigError(
                "epsilon prediction cannot run over a zero terminal SNR (rescale_betas_zero_snr)"
            )
        return cfg

    def table(self) -> np.ndarray:
        """alphas_cumprod (float64): the stored table, else computed as diffusers does."""
        if self.alphas_cumprod:
            return np.asarray(self.alphas_cumprod, dtype=np.float64)
        n = self.num_train_timesteps
        if self.beta_schedule == "linear":  # diffusers: float32 betas
            betas = np.linspace(self.beta_start, self.beta_end, n, dtype=np.float32).astype(np.float64)
        else:
            betas = np.linspace(self.beta_start**0.5, self.beta_end**0.5, n, dtype=np.float64) ** 2
        a = np.cumprod(1.0 - betas)
        s = self.snr_shift_scale
        a = a / (s + (1 - s) * a)
        if self.rescale_betas_zero_snr:
            r = np.sqrt(a)
            r0, rT = r[0], r[-1]
            a = ((r - rT) * (r0 / (r0 - rT))) ** 2
        return a


class CogVideoXScheduler:
    """Timesteps and the DDIM update shared by both CogVideoX schedulers."""

    name = "ddim"
    init_noise_sigma = 1.0

    def __init__(self, config: CogVideoXSchedulerConfig) -> None:
        self.config = config
        self.alphas_cumprod = config.table()
        self.final_alpha_cumprod = 1.0 if config.set_alpha_to_one else float(self.alphas_cumprod[0])
        self.timesteps = np.zeros(0, dtype=np.int64)
        self.num_steps = 0

    @staticmethod
    def schedule(c: CogVideoXSchedulerConfig, num_steps: int) -> np.ndarray:
        """The timesteps diffusers' ``set_timesteps`` gives (numpy there too, so bit-identical)."""
        n = c.num_train_timesteps
        if c.timestep_spacing == "linspace":
            return np.linspace(0, n - 1, num_steps).round()[::-1].copy().astype(np.int64)
        if c.timestep_spacing == "leading":
            ratio = n // num_steps
            return (np.arange(0, num_steps) * ratio).round()[::-1].copy().astype(np.int64) + c.steps_offset
        return np.round(np.arange(n, 0, -n / num_steps)).astype(np.int64) - 1

    def check_steps(self, num_steps: int) -> None:
        """Refuse a count that does not give ``num_steps`` distinct trained timesteps, one sentence."""
        c = self.config
        n = c.num_train_timesteps
        whole = isinstance(num_steps, (int, np.integer)) and not isinstance(num_steps, bool)
        ts = self.schedule(c, int(num_steps)) if whole and 1 <= num_steps <= n else None
        if ts is None or len(ts) != num_steps or ts.min() < 0 or ts.max() > n - 1 or (np.diff(ts) >= 0).any():
            raise ConfigError(
                f"{num_steps!r} steps do not give a usable {c.timestep_spacing} schedule over the CogVideoX "
                f"scheduler's {n} training timesteps"
            )

    def set_timesteps(self, num_steps: int) -> None:
        self.check_steps(num_steps)
        self.num_steps = int(num_steps)
        self.timesteps = self.schedule(self.config, self.num_steps)

    def _alphas(self, step_index: int) -> tuple[int, float, float]:
        t = int(self.timesteps[step_index])
        prev = t - self.config.num_train_timesteps // self.num_steps
        a_prev = float(self.alphas_cumprod[prev]) if prev >= 0 else self.final_alpha_cumprod
        return prev, float(self.alphas_cumprod[t]), a_prev

    def _x0(self, model_output: np.ndarray, sample: np.ndarray, a_t: float) -> np.ndarray:
        kind = self.config.prediction_type
        if kind == "epsilon":
            return (sample - np.float32((1 - a_t) ** 0.5) * model_output) / np.float32(a_t**0.5)
        if kind == "v_prediction":
            return np.float32(a_t**0.5) * sample - np.float32((1 - a_t) ** 0.5) * model_output
        return model_output

    def step(self, model_output: np.ndarray, step_index: int, sample: np.ndarray) -> np.ndarray:
        _, a_t, a_prev = self._alphas(step_index)
        x0 = self._x0(model_output, sample, a_t)
        a = ((1 - a_prev) / (1 - a_t)) ** 0.5
        b = a_prev**0.5 - a_t**0.5 * a
        return (np.float32(a) * sample + np.float32(b) * x0).astype(np.float32)


class CogVideoXDPMScheduler(CogVideoXScheduler):
    """DPM-Solver++ (2M) with noise injection, as ``CogVideoXDPMScheduler``: ``noise(shape)`` draws
    the unit normals diffusers draws from its generator (two per step after the first)."""

    name = "dpm"

    def __init__(self, config: CogVideoXSchedulerConfig, noise: Noise) -> None:
        super().__init__(config)
        self.noise = noise
        self._old_x0: np.ndarray | None = None

    def set_timesteps(self, num_steps: int) -> None:
        super().set_timesteps(num_steps)
        self._old_x0 = None

    @staticmethod
    def _lambda(a: float) -> float:
        return float(np.log(np.sqrt(np.float64(a) / (1 - np.float64(a)))))

    def step(self, model_output: np.ndarray, step_index: int, sample: np.ndarray) -> np.ndarray:
        prev, a_t, a_prev = self._alphas(step_index)
        back = float(self.alphas_cumprod[int(self.timesteps[step_index - 1])]) if step_index > 0 else None
        x0 = self._x0(model_output, sample, a_t)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            lam, lam_next = self._lambda(a_t), self._lambda(a_prev)
            h = lam_next - lam
            mult1 = ((1 - a_prev) / (1 - a_t)) ** 0.5 * math.exp(-h)
            mult2 = math.expm1(-2 * h) * a_prev**0.5
            mult_noise = (1 - a_prev) ** 0.5 * (1 - math.exp(-2 * h)) ** 0.5
            out = (
                np.float32(mult1) * sample
                - np.float32(mult2) * x0
                + np.float32(mult_noise) * self._draw(sample)
            )
            old, self._old_x0 = self._old_x0, x0
            if old is not None and prev >= 0 and back is not None:
                r = (lam - self._lambda(back)) / h
                mult3, mult4 = 1 + 1 / (2 * r), 1 / (2 * r)
                d = np.float32(mult3) * x0 - np.float32(mult4) * old
                out = (
                    np.float32(mult1) * sample
                    - np.float32(mult2) * d
                    + np.float32(mult_noise) * self._draw(sample)
                )
        return out.astype(np.float32)

    def _draw(self, like: np.ndarray) -> np.ndarray:
        return np.asarray(self.noise(like.shape), dtype=np.float32)


def make_cogvideox_scheduler(
    name: str, config: Mapping[str, Any], noise: Noise | None = None, seed: int = 0
) -> CogVideoXScheduler:
    """``ddim`` (CogVideoXDDIMScheduler) or ``dpm`` (CogVideoXDPMScheduler) over a CogVideoX config;
    the DPM scheduler's noise is drawn by ``noise``, else seeded numpy normals."""
    cfg = CogVideoXSchedulerConfig.from_dict(config)
    if name == "ddim":
        return CogVideoXScheduler(cfg)
    if name == "dpm":
        if noise is None:
            rng = np.random.default_rng([seed, 1])
            noise = lambda shape: rng.standard_normal(shape, dtype=np.float32)  # noqa: E731
        return CogVideoXDPMScheduler(cfg, noise)
    raise ConfigError(f"a CogVideoX decoder runs the ddim or dpm scheduler, not '{name}'")


def is_cogvideox_build(pipe: Pipeline) -> bool:
    """Whether the build's video denoiser is a CogVideoX transformer."""
    stages = pipe.build.pipeline.stage_names
    return "video_unet" in stages and pipe.build.pipeline.stage("video_unet").component.endswith(
        ".transformer"
    )


def check_steps(pipe: Pipeline, cfg: DiffusionConfig) -> None:
    """Refuse a scheduler or step count the build's CogVideoX decoder cannot take (one sentence)."""
    from omniforge.runtime import media as M

    make_cogvideox_scheduler(cfg.scheduler, pipe.build.json("video_scheduler")).check_steps(cfg.steps)
    M.vae_scaling(pipe.build.json("video_vae"))


def denoise(
    pipe: Pipeline,
    cond: np.ndarray,
    cfg: DiffusionConfig,
    latents: np.ndarray | None = None,
    noise: Noise | None = None,
) -> np.ndarray:
    """CogVideoXPipeline's loop: latents (1, F, C, h, w) after ``cfg.steps`` guided steps. ``noise``
    draws the DPM scheduler's injected normals (default: numpy seeded by ``cfg.seed``)."""
    sched = make_cogvideox_scheduler(
        cfg.scheduler, pipe.build.json("video_scheduler"), noise=noise, seed=cfg.seed
    )
    sched.set_timesteps(cfg.steps)
    start = (
        pipe.initial_latents("video", cfg.seed) if latents is None else pipe.check_latents("video", latents)
    )
    x = (start * np.float32(sched.init_noise_sigma)).astype(np.float32)
    guided = cfg.guidance_scale > 1.0
    context = np.concatenate([pipe.unconditional("video", cond), cond]) if guided else cond
    for i, t in enumerate(sched.timesteps):
        x_in = np.concatenate([x, x]) if guided else x
        ts = np.full((x_in.shape[0],), t, dtype=np.float32)
        pred = pipe._run("video_unet", {"latents": x_in, "timestep": ts, "encoder_hidden_states": context})
        v = pred["noise_pred"]
        if guided:
            v = v[:1] + np.float32(cfg.guidance_scale) * (v[1:] - v[:1])
        x = sched.step(v, i, x)
    pipe._release(["video_unet"])
    return x


def decode_video(
    pipe: Pipeline,
    cond: np.ndarray,
    cfg: DiffusionConfig,
    latents: np.ndarray | None = None,
    noise: Noise | None = None,
) -> np.ndarray:
    """Guided denoising, then the causal VAE: frames (F, H, W, 3) in [0, 1]."""
    x = denoise(pipe, cond, cfg, latents, noise)
    video = pipe._vae("video", np.ascontiguousarray(x.transpose(0, 2, 1, 3, 4)))  # (1, 3, F, H, W)
    return np.clip(video[0] / 2 + 0.5, 0, 1).transpose(1, 2, 3, 0)
