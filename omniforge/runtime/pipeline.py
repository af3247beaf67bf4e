"""The whole any-to-any pipeline, torch-free: media in, text plus images, video and audio out.

Input side: media front ends -> encoder engines -> input projector -> embedding rows spliced in
at the placeholders -> the LLM runtime. Output side: the hidden states at a modality's signal
tokens -> its output projector -> classifier-free-guided denoising over the UNet engine with a
numpy scheduler -> VAE decoder (-> vocoder for audio). Decoders load on first use and, with
``low_memory``, are released after each use.
"""

from __future__ import annotations

import io
import math
import os
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np

from omniforge.errors import ConfigError, InputError, ManifestError
from omniforge.pipeline.contracts import Slot
from omniforge.runtime import cogvideox
from omniforge.runtime import media as M
from omniforge.runtime.adapters import AUTO
from omniforge.runtime.build import Build
from omniforge.runtime.engine import SessionConfig
from omniforge.runtime.llm import GenerationResult, LlmRuntime
from omniforge.runtime.plan import planned
from omniforge.runtime.sampling import GenerationConfig
from omniforge.runtime.schedulers import SCHEDULERS, make_scheduler
from omniforge.runtime.tokenizer import SignalEvent

MODALITIES = ("image", "video", "audio")
ReadSound = Callable[[float, int | None], tuple[np.ndarray, int]]  # (max_seconds, channel) -> samples, rate


IB_LONGEST_S = 3600.0  # ImageBind audio read per request (also bounded by media.MAX_AUDIO_SAMPLES)
MAX_GUIDANCE = 1000.0  # beyond it the guided noise overflows float32
SILENCE = 1 / 32768  # one 16-bit step: a waveform whose peak is below it writes as all zeros


@dataclass(frozen=True)
class DiffusionConfig:
    """Denoising options. ``steps`` also has an upper bound set by the build's scheduler config
    (999 for DDIM over 1000 training timesteps with ``steps_offset`` 1); ``Pipeline.run`` refuses
    a count beyond it."""

    steps: int = 20
    guidance_scale: float = 7.5
    seed: int = 0
    scheduler: str = "ddim"

    def __post_init__(self) -> None:
        for name, value in (("steps", self.steps), ("seed", self.seed)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ConfigError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")
        if not 0 <= self.seed < 2**64:
            raise ConfigError(f"seed must lie in [0, 2**64), got {self.seed}")
        g = self.guidance_scale
        if isinstance(g, bool) or not isinstance(g, (int, float, np.integer, np.floating)):
            raise ConfigError(f"guidance scale must be a number, got {type(g).__name__} {g!r}")
        if not math.isfinite(g) or not 0 <= g <= MAX_GUIDANCE:
            raise ConfigError(f"guidance scale must be >= 0 and finite, at most {MAX_GUIDANCE:g}, got {g}")
        if not isinstance(self.scheduler, str) or self.scheduler not in SCHEDULERS:
            raise ConfigError(f"unknown scheduler '{self.scheduler}' (choose from {', '.join(SCHEDULERS)})")


@dataclass
class PipelineResult:
    text: str
    generation: GenerationResult
    images: list[np.ndarray] = field(default_factory=list)  # (H, W, 3) floats in [0, 1]
    videos: list[np.ndarray] = field(default_factory=list)  # (F, H, W, 3) floats in [0, 1]
    audios: list[np.ndarray] = field(default_factory=list)  # (samples,) floats in [-1, 1]
    sample_rate: int = 16000
    timings: dict[str, float] = field(default_factory=dict)  # stage or step -> seconds
    warnings: list[str] = field(default_factory=list)  # e.g. a generated waveform that is silent
    signals: list[SignalEvent] = field(default_factory=list)  # signal tokens the LLM generated

    def save(self, out: str | Path) -> list[Path]:
        """Write every generated medium to ``out`` (PNG, GIF + PNG frames, WAV), atomically; an
        output folder that cannot be written is one ``ConfigError``."""
        out = check_output_folder(out) if self.images or self.videos or self.audios else Path(out)
        try:
            return self._write(out)
        except OSError as exc:
            raise ConfigError(f"cannot write to output folder '{out}' ({exc.strerror or exc})") from None

    def _write(self, out: Path) -> list[Path]:
        written: list[Path] = []
        for i, img in enumerate(self.images):
            written.append(M.write_png(out / f"image_{i}.png", img))
        for i, vid in enumerate(self.videos):
            written.append(M.write_gif(out / f"video_{i}.gif", vid))
            for j, frame in enumerate(vid):
                written.append(M.write_png(out / f"video_{i}_frames" / f"{j:03d}.png", frame))
        for i, wav in enumerate(self.audios):
            written.append(M.write_wav(out / f"audio_{i}.wav", wav, self.sample_rate))
        return written


def check_output_folder(out: str | os.PathLike[str]) -> Path:
    """``out`` if media can be written there: an existing writable folder, or one that can be made
    in the nearest existing folder above it (nothing is created; writability is tried with a
    temporary file, so read-only mounts and pseudo file systems are caught). Else one ``ConfigError``."""
    if not isinstance(out, (str, os.PathLike)) or not str(out):
        raise ConfigError(f"the output folder must be a path, got {out!r}")
    p = Path(out)
    probe = p
    while not probe.exists() and probe != probe.parent:
        if probe.is_symlink():  # a dangling link: nothing can be made through it
            raise ConfigError(f"output folder '{p}' cannot be made: '{probe}' is a broken link")
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"output folder '{p}' cannot be used: '{probe}' is not a folder")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".omniforge-probe-", dir=probe)
    except OSError as exc:
        raise ConfigError(f"output folder '{p}' is not writable ('{probe}': {exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(tmp)
    return p


def _rows(embeds: np.ndarray) -> np.ndarray:
    """One item's encoder output as projector rows: a pooled (1, D) embedding stays one row; the
    tokens of (1, Q, D) become Q rows."""
    return embeds[0] if embeds.ndim == 3 else embeds


def _size(cfg: Mapping[str, object], key: str, high: int = 4096) -> int:
    """A positive integer setting of a front-end config, bounded (one ``ManifestError`` otherwise)."""
    v = cfg.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= high:
        raise ManifestError(f"the front-end config's '{key}' must be an integer in [1, {high}], got {v!r}")
    return v


class Pipeline:
    """A build's full NExT-GPT pipeline. ``run`` is the one call a service needs."""

    def __init__(
        self,
        build: Build | str | Path,
        low_memory: bool = False,
        session: SessionConfig | None = None,
        num_slots: int = 2,
        memory_budget: int | str | None = None,
    ) -> None:
        self.build = build if isinstance(build, Build) else Build(build, session)
        # with a budget, the memory plan's per-use stages are opened for a request and closed after it
        self.plan = None if memory_budget is None else planned(self, memory_budget, num_slots)
        self.llm = LlmRuntime(self.build, num_slots=num_slots)
        self.low_memory = low_memory
        # called with (stage, feeds) before every stage call and ("llm", {<embeds tensor>: rows}) per
        # prompt: how calibration captures each stage's real inputs
        self.recorder: Callable[[str, dict[str, np.ndarray]], None] | None = None
        self._local = threading.local()  # per-thread timings: requests may run concurrently

    @property
    def timings(self) -> defaultdict[str, float]:
        if not hasattr(self._local, "timings"):
            self._local.timings = defaultdict(float)
        return self._local.timings

    # ---- helpers ------------------------------------------------------------------------------
    def _run(self, stage: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.recorder is not None:
            self.recorder(stage, feeds)
        t0 = time.perf_counter()
        out = self.build.engine(stage).run(feeds)
        self.timings[stage] += time.perf_counter() - t0
        return out

    def _release(self, stages: Iterable[str]) -> None:
        if self.low_memory:
            for s in stages:
                self.build.release(s)

    def modalities_in(self) -> set[str]:
        return {m for m in MODALITIES if f"{m}_output_projector" in self.build.manifest.stages}

    # ---- input side ---------------------------------------------------------------------------
    def _project(self, embeds: np.ndarray, modality: str = "image") -> np.ndarray:
        """(n, D) encoder embeddings or tokens -> (n, H) LLM rows through ``modality``'s input
        projector (its own, else the shared one)."""
        own = f"{modality}_input_projector"
        stage = own if self.build.has_stage(own) else "input_projector"
        return self._run(stage, {"features": embeds[None].astype(np.float32)})["embeds"][0]

    def encode_image(self, image: str | Path | np.ndarray) -> np.ndarray:
        self._need("image_encoder", "image input")
        cfg = self.build.json("image_preprocessor")
        pic = image if isinstance(image, np.ndarray) else M.load_image(image)
        if cfg.get("kind") == "imagebind":  # a 2-frame clip of the image, as ImageBind feeds images
            from omniforge.runtime import imagebind_media as IB

            x = IB.image_clip(pic, size=_size(cfg, "size"))
        else:
            x = self._image_pixels(pic, cfg)
        return self._project(_rows(self._run("image_encoder", {"pixel_values": x[None]})["embeds"]))

    @staticmethod
    def _image_pixels(pic: object, cfg: Mapping[str, object]) -> np.ndarray:
        if cfg.get("kind") == "resize":  # BLIP's processor: exact size, no crop
            from omniforge.runtime.image_frontends import resize_normalize

            return resize_normalize(pic, cfg)
        return M.preprocess_image(pic, M.ImagePreprocessing.from_config(cfg))

    def encode_video(self, video: str | Path, track: str | Path | None = None) -> np.ndarray:
        """Frames sampled from ``video``, each preprocessed as it is decoded (one full-size frame in
        memory at a time), through the image encoder and mean-pooled. ImageBind: its clips (2-frame
        clips at spread start times, 3 spatial crops each), their embeddings averaged. ``track``: the
        video's sound (a WAV file, or a video file's audio stream: ``video`` itself for its own)
        through the audio encoder, fused with the frames' rows as the build's ``video_audio``
        config says (``runtime.video_audio``)."""
        self._need("image_encoder", "video input")
        if track is not None:
            from omniforge.runtime.video import load_sound
            from omniforge.runtime.video_audio import VideoAudio

            self._need("audio_encoder", "a video's sound track")
            files = self.build.manifest.files
            cfg = self.build.json("video_audio") if "video_audio" in files else {}
            fusion = VideoAudio.from_config(cfg, ManifestError)
            return fusion.fuse(self.encode_video(video), self._encode_sound(partial(load_sound, track)))
        cfg = self.build.json("image_preprocessor")
        if cfg.get("kind") == "imagebind":
            from omniforge.runtime import imagebind_media as IB
            from omniforge.runtime.video import read_picked_frames

            clips, per_clip = _size(cfg, "video_clips"), _size(cfg, "frames_per_clip")
            at, frames = read_picked_frames(
                video, lambda n, fps: IB.video_frame_indices(n, fps, clips=clips, frames_per_clip=per_clip)
            )
            picked = [[np.asarray(frames[int(i)]) for i in row] for row in at]
            x = IB.clips_from_frames(picked, size=_size(cfg, "size"))
        else:
            x = np.stack([self._image_pixels(f, cfg) for f in M.iter_video_frames(video, self.video_frames)])
        emb = self._run("image_encoder", {"pixel_values": x})["embeds"]  # (T, D) or (T, Q, D)
        return self._project(_rows(emb.mean(axis=0, keepdims=True)))  # temporal mean pooling

    def encode_audio(self, audio: str | Path) -> np.ndarray:
        """The audio encoder's embedding of the WAV file ``audio``: only the seconds its front end
        uses are read. ImageBind: fbank clips spread over the recording, their embeddings averaged."""
        return self._encode_sound(partial(M.load_wav, audio))

    def _encode_sound(self, read: ReadSound) -> np.ndarray:
        """The audio encoder's embedding of the recording ``read`` gives (a WAV file, a video's track)."""
        self._need("audio_encoder", "audio input")
        cfg = self.build.json("audio_frontend")
        if cfg.get("kind") == "imagebind":
            from omniforge.runtime import imagebind_media as IB

            # its clips are placed over the whole recording: read all of it (up to the sample
            # bound), first channel only, as ImageBind's torchaudio-based loader does
            samples, sr = read(IB_LONGEST_S, 0)
            x = IB.audio_clips(
                samples,
                sr,
                clips=_size(cfg, "clips"),
                n_mels=_size(cfg, "n_mels"),
                target_frames=_size(cfg, "target_frames"),
            )
            emb = self._run("audio_encoder", {"fbank": x})["embeds"]
            return self._project(emb.mean(axis=0, keepdims=True), "audio")
        if cfg.get("kind") == "whisper":  # log-mel over one window -> encoder tokens
            from omniforge.runtime.whisper_media import SAMPLE_RATE, log_mel

            window = _size(cfg, "window_s", 30)
            samples, sr = read(window, None)
            x = log_mel(M.resample(samples, sr, SAMPLE_RATE), _size(cfg, "n_mels", 256), window)
            return self._project(
                self._run("audio_encoder", {"input_features": x[None]})["embeds"][0], "audio"
            )
        if cfg.get("kind") == "clap":  # one pooled embedding of the clip
            from omniforge.runtime import clap_media as CL

            clap = CL.ClapFrontEnd.from_config(cfg)
            samples, sr = read(clap.read_seconds, None)
            x = CL.features(M.resample(samples, sr, clap.sample_rate), clap)
            return self._project(self._run("audio_encoder", {"input_features": x[None]})["embeds"], "audio")
        fe = M.AudioFrontEnd.from_config(cfg)
        samples, sr = read(fe.read_seconds, None)
        feats = M.audio_features(samples, sr, fe)
        return self._project(self._run("audio_encoder", {"log_mel": feats[None]})["embeds"], "audio")

    @property
    def video_frames(self) -> int:
        """Frames sampled from an input video: the video decoder's frame count (at most
        ``media.MAX_VIDEO_FRAMES``)."""
        if not self.build.has_stage("video_unet"):
            return 4
        return M.check_frame_count(self.build.pipeline.stage("video_unet").dim("frames").opt)

    def _need(self, stage: str, what: str) -> None:
        if not self.build.has_stage(stage):
            raise InputError(f"this build cannot take {what}: it has no '{stage}' stage")

    # ---- output side --------------------------------------------------------------------------
    def signal_hidden(self, rows: np.ndarray, modality: str, adapter: str | None = None) -> np.ndarray:
        """Hidden states of ``modality``'s signal tokens appended after ``rows`` (teacher forcing), at
        the position the build's protocol reads them from."""
        predicting = self.llm.signal_position == "predicting"
        return self.llm.hidden_after(rows, self.signal_ids(modality), predicting=predicting, adapter=adapter)

    def signal_ids(self, modality: str) -> list[int]:
        tokens = self.build.pipeline.signal_tokens.get(modality, [])
        ids = [self.llm.tokenizer.token_id(t) for t in tokens] if self.llm.tokenizer else []
        if not ids or None in ids:
            raise InputError(f"this build has no signal tokens for '{modality}'")
        return ids  # type: ignore[return-value]

    def conditioning(self, modality: str, hidden: np.ndarray) -> np.ndarray:
        """Signal-token hidden states (n, H) -> the decoder's conditioning (1, Q, D). A projector
        that also takes the signal tokens' input embeddings (NExT-GPT's) gets them."""
        stage = self.build.pipeline.stage(f"{modality}_output_projector")
        rows_in, *more = stage.input_names
        feeds = {rows_in: hidden[None].astype(np.float32)}
        if more:
            feeds[more[0]] = self.llm.embed_ids(self.signal_ids(modality))[None]
        return self._run(stage.name, feeds)[stage.output_names[0]]

    def unconditional(self, modality: str, cond: np.ndarray) -> np.ndarray:
        """The guidance's unconditional input: the decoder's own empty-prompt embedding where the
        build carries one (as diffusers' pipelines compute it), else zeros."""
        role = f"{modality}_uncond"
        if role not in self.build.manifest.files:
            return np.zeros_like(cond)
        try:
            arr = np.load(io.BytesIO(self.build.read(self.build.manifest.files[role])), allow_pickle=False)
        except ValueError as exc:
            raise ManifestError(
                f"the {modality} unconditional embedding is not a numpy array ({exc})"
            ) from None
        if arr.size != cond.size or arr.dtype.kind != "f" or not np.isfinite(arr).all():
            raise ManifestError(
                f"the {modality} unconditional embedding has {arr.size} values of {arr.dtype}; "
                f"the conditioning has {cond.size} finite floats"
            )
        return arr.reshape(cond.shape).astype(np.float32)

    def latent_shape(self, modality: str) -> tuple[int, ...]:
        """The shape of ``modality``'s initial latents (batch 1), e.g. (1, 4, 16, 16) for images."""
        self._need(f"{modality}_unet", f"latents for '{modality}'")
        spec = self.build.pipeline.stage(f"{modality}_unet")
        sizes = {d.name: d.opt for d in spec.dims} | {"batch": 1}
        if modality == "video":
            sizes["frames"] = self.video_frames
        return spec.inputs[0].concrete_shape(sizes)

    def initial_latents(self, modality: str, seed: int) -> np.ndarray:
        """The unit-variance noise a run with ``seed`` starts ``modality``'s denoising from."""
        return np.random.default_rng(seed).standard_normal(self.latent_shape(modality)).astype(np.float32)

    def check_latents(self, modality: str, latents: np.ndarray) -> np.ndarray:
        """``latents`` as float32 if they fit ``modality``'s decoder, else one ``InputError``."""
        if modality not in self.modalities_in():
            raise InputError(f"this build cannot generate '{modality}', so it takes no latents for it")
        shape = self.latent_shape(modality)
        if not isinstance(latents, np.ndarray) or latents.dtype.kind != "f":
            kind = latents.dtype if isinstance(latents, np.ndarray) else type(latents).__name__
            raise InputError(f"{modality} latents must be a floating-point numpy array, got {kind}")
        if latents.shape != shape:
            raise InputError(f"{modality} latents must have shape {shape}, got {latents.shape}")
        if not np.isfinite(latents).all():
            raise InputError(f"{modality} latents hold NaN or infinite values")
        return np.ascontiguousarray(latents, dtype=np.float32)

    def check_steps(self, modality: str, cfg: DiffusionConfig) -> None:
        """Refuse a step count ``modality``'s scheduler cannot take (``ConfigError``, one sentence)."""
        if modality == "video" and cogvideox.is_cogvideox_build(self):
            return cogvideox.check_steps(self, cfg)
        make_scheduler(cfg.scheduler, self.build.json(f"{modality}_scheduler")).check_steps(cfg.steps)
        M.vae_scaling(self.build.json(f"{modality}_vae"))  # the decoder configs too, before any work
        if modality == "audio" and "vocoder" in self.build.manifest.files:
            M.check_vocoder_config(self.build.json("vocoder"))

    def _denoise(
        self, modality: str, cond: np.ndarray, cfg: DiffusionConfig, latents: np.ndarray | None = None
    ) -> np.ndarray:
        unet_name = f"{modality}_unet"
        spec = self.build.pipeline.stage(unet_name)
        sched = make_scheduler(cfg.scheduler, self.build.json(f"{modality}_scheduler"))
        sched.set_timesteps(cfg.steps)
        # as diffusers: given or seeded, the initial noise is scaled by the scheduler's sigma
        if latents is None:
            noise = self.initial_latents(modality, cfg.seed)
        else:
            noise = self.check_latents(modality, latents)
        latents = (noise * np.float32(sched.init_noise_sigma)).astype(np.float32)
        cond_name = spec.input_names[2]
        uncond = self.unconditional(modality, cond)
        guided = cfg.guidance_scale > 1.0
        context = np.concatenate([uncond, cond]) if guided else cond
        for i, t in enumerate(sched.timesteps):
            x = sched.scale_model_input(latents, i)
            x_in = np.concatenate([x, x]) if guided else x
            ts = np.full((x_in.shape[0],), t, dtype=np.float32)
            eps = self._run(unet_name, {"sample": x_in, "timestep": ts, cond_name: context})["noise_pred"]
            if guided:
                eu, ec = eps[:1], eps[1:]
                eps = eu + np.float32(cfg.guidance_scale) * (ec - eu)
            latents = sched.step(eps, i, latents)
        self._release([unet_name])
        return latents

    def _vae(self, modality: str, latents: np.ndarray) -> np.ndarray:
        scale = M.vae_scaling(self.build.json(f"{modality}_vae"))
        name = f"{modality}_vae_decoder"
        out = self._run(name, {"latent": (latents / np.float32(scale)).astype(np.float32)})
        self._release([name])
        return next(iter(out.values()))

    def decode_image(
        self, cond: np.ndarray, cfg: DiffusionConfig, latents: np.ndarray | None = None
    ) -> np.ndarray:
        latents = self._denoise("image", cond, cfg, latents)
        img = self._vae("image", latents)[0]  # (3, H, W) in [-1, 1]
        return np.clip(img / 2 + 0.5, 0, 1).transpose(1, 2, 0)

    def decode_video(
        self, cond: np.ndarray, cfg: DiffusionConfig, latents: np.ndarray | None = None
    ) -> np.ndarray:
        if cogvideox.is_cogvideox_build(self):  # a CogVideoX transformer + causal 3D VAE
            return cogvideox.decode_video(self, cond, cfg, latents)
        latents = self._denoise("video", cond, cfg, latents)  # (1, C, F, h, w)
        frames = latents[0].transpose(1, 0, 2, 3)  # (F, C, h, w)
        imgs = self._vae("video", np.ascontiguousarray(frames))  # (F, 3, H, W)
        return np.clip(imgs / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)

    def decode_audio(
        self, cond: np.ndarray, cfg: DiffusionConfig, latents: np.ndarray | None = None
    ) -> np.ndarray:
        latents = self._denoise("audio", cond.reshape(1, -1), cfg, latents)
        mel = self._vae("audio", latents)[:, 0]  # (1, T, M)
        wav = self._run("vocoder", {"mel": np.ascontiguousarray(mel)})["waveform"][0]
        self._release(["vocoder"])
        return wav

    @property
    def sample_rate(self) -> int:
        if "vocoder" in self.build.manifest.files:
            return M.check_vocoder_config(self.build.json("vocoder"))
        return 16000

    def _generated_signal_rows(self, gen: GenerationResult, modality: str) -> np.ndarray | None:
        """The hidden states of the first complete, in-order run of ``modality``'s signal tokens the
        LLM generated (``[IMG0] [IMG1] [IMG2] [IMG3]``), or None when it generated no such run."""
        rows = gen.signal_hidden.get(modality)
        if rows is None:
            return None
        ids = self.signal_ids(modality)
        n, toks = len(ids), gen.token_ids
        at = [i for i, t in enumerate(toks) if self.llm.signal_ids.get(t) == modality]  # one row each
        for k, i in enumerate(at):
            if toks[i : i + n] == ids and k + n <= len(rows):
                return rows[k : k + n]
        return None

    # ---- request checks ----------------------------------------------------------------------
    def _options(
        self,
        generation: GenerationConfig | None,
        diffusion: DiffusionConfig | None,
        force: Iterable[str],
        on_text: Callable[[str], None] | None,
    ) -> tuple[GenerationConfig, DiffusionConfig, set[str]]:
        """The request's options, each checked for its type and value (one error, before any work)."""
        generation = GenerationConfig() if generation is None else generation
        diffusion = DiffusionConfig() if diffusion is None else diffusion
        if not isinstance(generation, GenerationConfig):
            raise ConfigError(f"generation must be a GenerationConfig, got {type(generation).__name__}")
        if not isinstance(diffusion, DiffusionConfig):
            raise ConfigError(f"diffusion must be a DiffusionConfig, got {type(diffusion).__name__}")
        if on_text is not None and not callable(on_text):
            raise InputError(f"on_text must be callable, got {type(on_text).__name__}")
        try:
            forced = {force} if isinstance(force, str) else set(force)
        except TypeError:
            raise InputError(f"force must name modalities, got {type(force).__name__}") from None
        bad = [m for m in forced if m not in MODALITIES]
        if bad:
            raise InputError(
                f"unknown modality {sorted(map(str, bad))} (choose from {', '.join(MODALITIES)})"
            )
        missing = forced - self.modalities_in()
        if missing:
            raise InputError(f"this build cannot generate {sorted(missing)}")
        return generation, diffusion, forced

    def _latents(self, latents: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
        if latents is None:
            return {}
        if not isinstance(latents, Mapping):
            raise InputError(f"latents must map a modality to an array, got {type(latents).__name__}")
        return {m: self.check_latents(m, x) for m, x in latents.items()}

    def _reserve_signal_room(
        self, fed: int, force: set[str], generation: GenerationConfig
    ) -> GenerationConfig:
        """Check that the signal tokens a forced modality appends after the prompt fit the context,
        and cap the generated text so that they still fit after it (``ContextLengthError``)."""
        counts = {m: len(self.build.pipeline.signal_tokens.get(m, [])) for m in force}
        if not counts:
            return generation
        modality = max(counts, key=lambda m: counts[m])
        n = counts[modality]
        self.llm.check_fits(
            fed + n, f"the prompt ({fed} tokens) followed by the {n} signal tokens of forced {modality}"
        )
        room = self.llm.pool.max_context - 1 - fed - n
        if room >= generation.max_new_tokens:
            return generation
        return replace(generation, max_new_tokens=max(1, room))

    # ---- the one call -------------------------------------------------------------------------
    def run(
        self,
        prompt: str,
        image: str | Path | np.ndarray | None = None,
        audio: str | Path | None = None,
        video: str | Path | None = None,
        generation: GenerationConfig | None = None,
        diffusion: DiffusionConfig | None = None,
        force: Iterable[str] = (),
        on_text: Callable[[str], None] | None = None,
        latents: Mapping[str, np.ndarray] | None = None,
        adapter: str | None = AUTO,
        video_audio: str | Path | Literal[False] | None = None,
    ) -> PipelineResult:
        """Generate text for ``prompt`` (+ media) and every medium whose signal tokens appear.

        ``adapter``: the LoRA adapter the LLM runs with: a name, ``none``, or ``auto`` (the
        build's rule over the media given and the modalities forced out).
        ``force`` names modalities to generate even if the LLM emits none of their signal tokens.
        ``latents`` maps a modality to the noise its denoising starts from instead of the seeded
        noise: floats of ``latent_shape(modality)``, unit variance (scaled by the scheduler's initial
        sigma, as in diffusers); ``initial_latents(modality, seed)`` gives a seed's own.
        A generated waveform that is silent is reported in ``result.warnings``.
        ``video_audio``: the video's sound track (a WAV file, or a video file's audio stream),
        encoded beside its frames. Without it, a video file's own audio stream is its track when
        the build has an audio encoder; a build without one encodes the frames alone, as does
        ``video_audio=False``.
        """
        generation, diffusion, force = self._options(generation, diffusion, force, on_text)
        given = self._latents(latents)
        own_track = video_audio is None
        if video_audio is False:  # the frames alone, whatever sound the video file has
            video_audio = None
        elif video_audio is not None and video is None:
            raise InputError("a video's sound track was given without a video")
        if video is not None and own_track and self.build.has_stage("audio_encoder"):
            from omniforge.runtime.video import has_sound

            video_audio = video if has_sound(video) else None
        asked = [m for m, x in (("image", image), ("audio", audio), ("video", video)) if x is not None]
        adapter_name = self.llm.resolve_adapter(adapter, [*asked, *sorted(force)])
        for modality in sorted(force):
            self.check_steps(modality, diffusion)
        if not isinstance(prompt, str) and any(m is not None for m in (image, audio, video)):
            raise InputError("a prompt with media must be text, so that a placeholder can mark each medium")
        self._local.timings = defaultdict(float)
        t_all = time.perf_counter()
        media: dict[str, list[np.ndarray]] = {}
        protocol = self.llm.protocol
        for modality, item, enc in (
            ("image", image, self.encode_image),
            ("audio", audio, self.encode_audio),
            ("video", video, lambda v: self.encode_video(v, video_audio)),
        ):
            if item is None:
                continue
            media[modality] = [enc(item)]
            tag = self.build.pipeline.placeholders.get(modality, f"<{modality}>")
            if protocol is None and tag not in prompt:
                prompt = f"{tag} {prompt}"
        if protocol is not None:  # the model's conversation layout (NExT-GPT's) and its stop strings
            items = [(m, rows) for m, got in media.items() for rows in got]
            rows, ids = self.llm.prepare_protocol(prompt, items)
            if not generation.stop_strings:
                generation = replace(generation, stop_strings=protocol.stop_strings)
        else:
            rows, ids = self.llm.prepare(prompt, media)
        generation = self._reserve_signal_room(len(rows), force, generation)
        if self.recorder is not None:
            self.recorder("llm", {self.llm.engine.names[Slot.EMBEDS]: rows})
        t0 = time.perf_counter()
        gen = self.llm.generate_rows(
            [rows], [ids], generation, (lambda _i, d: on_text(d)) if on_text else None, [adapter_name]
        )[0]
        self.timings["llm"] += time.perf_counter() - t0
        result = PipelineResult(
            text=gen.text, generation=gen, sample_rate=self.sample_rate, signals=list(gen.signals)
        )
        if protocol is not None:  # NExT-GPT generates a modality where its first signal token appears
            first = {self.signal_ids(m)[0]: m for m in self.modalities_in()}
            emitted = {first[t] for t in gen.token_ids if t in first}
        else:
            emitted = {self.llm.signal_ids[t] for t in gen.token_ids if t in self.llm.signal_ids}
        for modality in MODALITIES:
            if modality not in force and modality not in emitted:
                continue
            if modality not in self.modalities_in():
                continue
            n = len(self.build.pipeline.signal_tokens[modality])
            got = self._generated_signal_rows(gen, modality)
            t0 = time.perf_counter()
            if got is not None:
                hidden = got
            else:  # teacher-force the full set after the prompt and the generated text
                text_ids = [t for t in gen.token_ids if t not in self.llm.stop_ids(generation)]
                text_ids = text_ids[: max(0, self.llm.pool.max_context - 1 - len(rows) - n)]  # what fits
                fed = np.concatenate([rows, self.llm.embed_ids(text_ids)]) if text_ids else rows
                hidden = self.signal_hidden(fed, modality, adapter_name)
            self.timings["signal_tokens"] += time.perf_counter() - t0
            cond = self.conditioning(modality, hidden)
            if modality == "image":
                result.images.append(self.decode_image(cond, diffusion, given.get(modality)))
            elif modality == "video":
                result.videos.append(self.decode_video(cond, diffusion, given.get(modality)))
            else:
                result.audios.append(self.decode_audio(cond, diffusion, given.get(modality)))
                peak = float(np.abs(result.audios[-1]).max(initial=0.0))
                if peak < SILENCE:
                    result.warnings.append(
                        f"generated audio {len(result.audios) - 1} is silent: its peak {peak:.2g} is "
                        "below one 16-bit step"
                    )
        self.timings["total"] = time.perf_counter() - t_all
        result.timings = dict(self.timings)
        return result
