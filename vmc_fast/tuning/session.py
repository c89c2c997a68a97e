"""A tuning session: one backbone prepared once, then any number of videos tuned with it.

Setup is a fixed sequence of named steps — load → surgery → fingerprint → frozen precision → packing →
checkpointing → attention backend → compile; the optimizer step comes last (a plain optimizer per video, or one DeepSpeed engine
per session, see vmc_fast.tuning.steps).
Between videos only the trainable tensors are reset (copied back from a snapshot), so nothing is rebuilt and
frozen weights are never copied per video. With ``--lora-rank`` the trainable tensors are the LoRA factors
(`vmc_fast.tuning.lora`): the snapshot holds B = 0 and A drawn from the run's seed, so every video starts from the
same factors whatever its position.
With --pack K the tuned layers hold K videos' slices
(`vmc_fast.tuning.packing`) and `tune_pack` tunes up to K videos in one pass.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from vmc_fast.config import RunConfig
from vmc_fast.errors import VmcWarning
from vmc_fast.io.files import atomic_save_file
from vmc_fast.io.prompts import embedding_model_key, encode_prompts
from vmc_fast.io.video import ClipInfo, FrameSampling, read_clip
from vmc_fast.models.registry import Backbone, LoadOptions, load_backbone
from vmc_fast.runtime import COMPUTE_DTYPES, compute_dtype
from vmc_fast.tuning.adapters import base_fingerprint, base_reference, sampled_frames, save_adapter
from vmc_fast.tuning.loop import PackStep, StepStats, TuneResult, tune, tune_pack
from vmc_fast.tuning.lora import LoraSettings
from vmc_fast.tuning.losses import loss_formula
from vmc_fast.tuning.packing import MAX_PACK, PackEstimate, PackState, install_packing, video_generator, video_state
from vmc_fast.tuning.steps import OptimizerStep, PackedTorchStep, TorchStep, whole_parameters
from vmc_fast.tuning.surgery import (
    SurgeryReport,
    prepare_for_lora_tuning,
    prepare_for_motion_tuning,
    trainable_state,
)


@dataclass
class VideoResult:
    """One tuned video."""

    adapter: Path
    """The written adapter file."""
    result: TuneResult
    """Losses and timing."""
    peak_memory_bytes: int
    """Peak accelerator memory allocated during tuning (0 on CPU)."""
    clip: ClipInfo | None = None
    """Which frames were taken from the video, turned, cropped and resized how."""
    encoded_prompt: str | None = None
    """The part of the prompt the text encoder read (shorter than the prompt when it was cut); None: unknown."""


@dataclass
class PackItem:
    """One video of a pack (`TuningSession.tune_pack`)."""

    video: Path
    """The video file or frame folder."""
    prompt: str
    """Its prompt."""
    text_states: torch.Tensor
    """(L, D) its prompt embedding."""
    adapter_path: Path
    """Where its adapter goes."""
    request_hash: str | None = None
    """The run's key for this video, recorded in the adapter."""


class TuningSession:
    """Holds the prepared backbone; `tune_video` tunes one clip and writes its adapter, `tune_pack` up to
    `pack_size` clips in one pass.

    num_videos: how many videos this session will tune (caps --pack; None: no cap). make_pack_step(unet, params)
    builds the optimizer step of a pack (default: `PackedTorchStep`). agree_pack_size(K) -> the K every rank
    uses (ZeRO: the smallest ``auto`` estimate of all ranks)."""

    def __init__(self, cfg: RunConfig, device: str = "cpu",
                 make_optimizer_step: Callable[[torch.nn.Module, list], OptimizerStep] | None = None,
                 write_adapters: bool = True, num_videos: int | None = None,
                 make_pack_step: Callable[[torch.nn.Module, list], PackStep] | None = None,
                 agree_pack_size: Callable[[int], int] | None = None, init_seed: int | None = None):
        """`init_seed`: seed of the LoRA factors' initialisation (default: cfg.train.seed, the same on every rank:
        ranks that tune one video together must start from the same factors; each rank's own noise comes from
        its per-video generators, which take the rank)."""
        self.cfg = cfg
        self.init_seed = cfg.train.seed if init_seed is None else init_seed
        self.write_adapters = write_adapters
        self.device = torch.device(device)
        self.backbone = self._load()
        self.surgery = self._surgery()
        trainable_names = {n for n, p in self.backbone.unet.named_parameters() if p.requires_grad}
        self.fingerprint = base_fingerprint(self.backbone.unet, exclude=trainable_names)  # before any requantising
        self.base = base_reference(self.backbone.unet, exclude=trainable_names)
        self.precision = self._frozen_precision()
        self.pack_estimate: PackEstimate | None = None
        self.pack: PackState | None = self._packing(num_videos, agree_pack_size)
        self._checkpointing()
        self._attention_backend()
        self._compile()
        self.params = [p for p in self.backbone.unet.parameters() if p.requires_grad]
        self._initial = [p.detach().clone() for p in self.params]
        self._make_optimizer_step = make_optimizer_step or (lambda unet, params: TorchStep(params, cfg.train))
        self._optimizer_step: OptimizerStep | None = None  # the latest; it knows whether parameters are partitioned
        self._make_pack_step = make_pack_step or (lambda unet, params: PackedTorchStep(params, cfg.train))
        self.rank = 0
        """Under --strategy zero each rank draws its own noise: the rank goes into every video's generator."""
        self.sampling = self._sampling()
        self.encoded_prompts: dict[str, str | None] = {}  # prompt -> what its text encoder read

    # ------------------------------------------------------------------------------------------ setup steps

    def _load(self) -> Backbone:
        if self.cfg.model.frozen_dtype == "bf16" and self.compute_dtype == torch.float32:
            raise ValueError("--frozen-dtype bf16: bf16 weights need bf16 compute; pass --precision bf16 "
                             "(slow on most CPUs) or --frozen-dtype fp32")
        frozen = self.cfg.model.frozen_dtype
        dtype = COMPUTE_DTYPES[frozen] if frozen in ("fp32", "bf16") else self.compute_dtype
        return load_backbone(self.cfg.model.model_id, LoadOptions(dtype=dtype, device=str(self.device)))

    @property
    def compute_dtype(self) -> torch.dtype:
        return compute_dtype(self.cfg.train.precision, self.device)

    def _frozen_precision(self):
        if self.cfg.model.frozen_dtype != "int8":
            return None  # fp32/bf16 storage was chosen at load time
        from vmc_fast.tuning.precision import apply_frozen_precision

        return apply_frozen_precision(self.backbone.unet, "int8", self.compute_dtype)

    def _surgery(self) -> SurgeryReport:
        pattern = self.cfg.model.trainable_pattern or self.backbone.trainable_pattern
        if self.lora is not None:  # PEFT LoRA layers on the same Q/K/V, initialised from the run's seed
            return prepare_for_lora_tuning(self.backbone.unet, self.lora, pattern, seed=self.init_seed)
        return prepare_for_motion_tuning(self.backbone.unet, pattern)

    @property
    def lora(self) -> LoraSettings | None:
        """Rank and alpha of the LoRA this session trains (`vmc_fast.tuning.lora`); None: full Q/K/V tuning."""
        model = self.cfg.model
        return LoraSettings(model.lora_rank, model.lora_alpha or model.lora_rank) if model.lora_rank else None

    def _packing(self, num_videos: int | None, agree: Callable[[int], int] | None = None) -> PackState | None:
        """--pack K > 1: replace the tuned Linears by K-slice ones (before checkpointing and compile, which then
        see the packed layers). K is capped at `num_videos`; ``auto`` measures what fits and prints why."""
        limit = min(num_videos or MAX_PACK, MAX_PACK)
        if self.cfg.parallel.pack == "auto":
            from vmc_fast.tuning.packing import estimate_pack, free_memory_bytes

            activations = self._activation_bytes()
            self.pack_estimate = estimate_pack(self.surgery.num_trainable, activations,
                                               free_memory_bytes(self.device), limit)
            print(self.pack_estimate, file=sys.stderr, flush=True)
            size = self.pack_estimate.num_videos
        else:
            size = min(int(self.cfg.parallel.pack), limit)
        size = agree(size) if agree is not None else size
        return install_packing(self.backbone.unet, size) if size > 1 else None

    def _activation_bytes(self) -> int:
        from vmc_fast.runtime import autocast
        from vmc_fast.tuning.packing import activation_bytes

        bb, data = self.backbone, self.cfg.data
        scale = 2 ** (len(bb.vae.config.block_out_channels) - 1) if bb.vae is not None else 1
        shape = (1, bb.in_channels, data.num_frames or bb.num_frames, (data.height or bb.height) // scale,
                 (data.width or bb.width) // scale)
        config = bb.unet.config
        width = int(getattr(config, "encoder_hid_dim", None) or config.cross_attention_dim)
        sample = torch.zeros(shape, device=self.device, dtype=torch.float32)
        states = torch.zeros(1, 77, width, device=self.device, dtype=torch.float32)
        with autocast(self.cfg.train.precision, device=self.device):
            return activation_bytes(bb.unet, sample, torch.tensor([500], device=self.device), states)

    @property
    def pack_size(self) -> int:
        """K: videos tuned in one pass (1 without packing)."""
        return self.pack.num_slots if self.pack is not None else 1

    def _checkpointing(self) -> None:
        if not self.cfg.model.gradient_checkpointing:
            return
        unet = self.backbone.unet
        if not hasattr(unet, "enable_gradient_checkpointing"):
            raise ValueError(f"--checkpointing: model {self.cfg.model.model_id} does not support it")
        unet.enable_gradient_checkpointing()

    def _attention_backend(self) -> None:
        if self.cfg.model.attention == "sdpa":
            return  # every backbone's default
        from vmc_fast.models.attention import set_temporal_attention_backend

        set_temporal_attention_backend(self.backbone.unet, self.cfg.model.attention)

    def _compile(self) -> None:
        # Compiled in place, once per session: later videos only copy weights, so the graphs are reused.
        if self.cfg.model.compile == "off":
            return
        from vmc_fast.tuning.compile import compile_unet

        self.backbone.unet = compile_unet(self.backbone.unet, mode=self.cfg.model.compile)

    def _sampling(self) -> FrameSampling:
        data, bb = self.cfg.data, self.backbone
        return FrameSampling(
            num_frames=data.num_frames or bb.num_frames, height=data.height or bb.height,
            width=data.width or bb.width, stride=data.frame_stride, start=data.start_frame,
            resize=data.resize, reverse=data.reverse, fps=data.fps, background=data.background,
        )

    # ------------------------------------------------------------------------------------------ per video

    def prompt_embeddings(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Embeddings of all prompts of a run, computed in one encoder session (then the encoder is freed).
        Warns for prompts longer than the encoder reads; adapters record what it read."""
        encoded = encode_prompts(prompts, self._model_key(), self.cfg.cache_dir, self.backbone.load_text_encoder)
        self.encoded_prompts.update({p: e.encoded_text for p, e in encoded.items()})
        return {p: e.states for p, e in encoded.items()}

    def _model_key(self) -> str:
        return embedding_model_key(self.cfg.model.model_id, self.backbone.family)

    def load_input(self, video: Path) -> torch.Tensor:
        """The video as the UNet's input: (1, C, F, h, w) float32 on the session device (see `read_input`)."""
        return self.read_input(video)[0]

    def read_input(self, video: Path) -> tuple[torch.Tensor, ClipInfo]:
        """The video as the UNet's input, (1, C, F, h, w) float32 on the session device, and what was taken.

        Latent models encode with their VAE once; the latents are cached on disk, keyed by model, file and sampling,
        with the ClipInfo beside them, so a cache hit reports (and warns) as a fresh read does.
        """
        if self.backbone.vae is None:
            pixels, info = read_clip(video, self.sampling)
            return pixels.unsqueeze(0).to(self.device), info
        cache = Path(self.cfg.cache_dir) / "latents" / f"{self._latent_key(video)}.safetensors"
        cached = _read_latent_cache(cache)
        if cached is not None:
            return cached[0].to(self.device), cached[1]
        pixels, info = read_clip(video, self.sampling)
        latents = self.backbone.encode_pixels(pixels.unsqueeze(0).to(self.device)).float()
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_file({"latents": latents.cpu().contiguous()}, cache,
                         {"video": str(video), "clip": json.dumps(info.record(), sort_keys=True)})
        return latents, info

    def _latent_key(self, video: Path) -> str:
        stat = video.stat()
        parts = [self._model_key(), self.fingerprint, str(video.resolve()), str(stat.st_size), str(stat.st_mtime_ns),
                 repr(self.sampling)]
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]

    def tune_video(self, video: Path, prompt: str, text_states: torch.Tensor, adapter_path: Path,
                   on_step: Callable[[StepStats], None] | None = None,
                   on_clip: Callable[[ClipInfo], None] | None = None, *, request_hash: str | None = None) -> VideoResult:
        """Reset the tuned tensors, tune on `video`, write the adapter atomically. `on_clip` hears what was taken
        from the video before tuning starts; the adapter records `request_hash`, the run's key for this video
        (`vmc_fast.runs.library.request_key`)."""
        if self.pack is not None:
            item = PackItem(video, prompt, text_states, adapter_path, request_hash)
            done = self.tune_pack([item], on_step, None if on_clip is None else lambda _, info: on_clip(info))[0]
            if isinstance(done, BaseException):
                raise done
            return done
        clip, clip_info = self.read_input(video)
        if on_clip is not None:
            on_clip(clip_info)
        self.reset_trainable()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        unet = self.backbone.unet
        self._optimizer_step = self._make_optimizer_step(unet, self.params)
        states = text_states.unsqueeze(0).to(self.device)
        result = tune(unet, self.backbone.noise_scheduler.alphas_cumprod, clip, states, self.cfg.train,
                      self._optimizer_step, on_step, generator=self.generator(video))
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else 0
        with whole_parameters(self._optimizer_step):  # on every rank: under ZeRO-3 gathering is collective
            state = trainable_state(unet)
        if self.write_adapters:
            self.save(adapter_path, prompt, result, state, video=video, clip=clip_info, request_hash=request_hash)
        return VideoResult(adapter=adapter_path, result=result, peak_memory_bytes=peak, clip=clip_info,
                           encoded_prompt=self.encoded_prompts.get(prompt))

    def generator(self, video: Path) -> torch.Generator:
        """The video's own generator of timesteps and noise (`video_generator`: run seed, file name, rank)."""
        return video_generator(self.cfg.train.seed, Path(video).name, self.rank)

    def tune_pack(self, items: list[PackItem], on_step: Callable[[StepStats], None] | None = None,
                  on_clip: Callable[[int, ClipInfo], None] | None = None) -> list[VideoResult | Exception]:
        """Tune up to `pack_size` videos in one pass and write each adapter; per item, its VideoResult or the
        exception that failed it (an unreadable video fails before the pack starts, a NaN loss alone while the
        others go on). on_clip(index, info) hears what was taken from each video."""
        assert self.pack is not None and 1 <= len(items) <= self.pack.num_slots
        outcomes: list = [None] * len(items)
        clips = {}
        for index, item in enumerate(items):
            try:
                clips[index], info = self.read_input(item.video)
            except Exception as exc:  # this video fails; the pack goes on without it
                outcomes[index] = exc
                continue
            if on_clip is not None:
                on_clip(index, info)
            outcomes[index] = info
        loaded = list(clips)
        if not loaded:
            return outcomes
        self.pack.num_active = len(loaded)
        self.reset_trainable()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        unet = self.backbone.unet
        step = self._make_pack_step(unet, self.params)
        self._optimizer_step = step
        states = torch.stack([items[k].text_states for k in loaded]).to(self.device)
        results = tune_pack(unet, self.backbone.noise_scheduler.alphas_cumprod, torch.cat([clips[k] for k in loaded]),
                            states, self.cfg.train, step, [self.generator(items[k].video) for k in loaded], on_step)
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else 0
        for slot, (index, result) in enumerate(zip(loaded, results)):
            outcomes[index] = result if isinstance(result, BaseException) else \
                self._finish_slot(items[index], slot, result, outcomes[index], peak)
        return outcomes

    def _finish_slot(self, item: PackItem, slot: int, result: TuneResult, clip: ClipInfo, peak: int
                     ) -> VideoResult | Exception:
        try:
            with whole_parameters(self._optimizer_step):
                state = video_state(self.backbone.unet, slot)
            if self.write_adapters:
                self.save(item.adapter_path, item.prompt, result, state, video=item.video, clip=clip,
                          request_hash=item.request_hash)
        except Exception as exc:  # e.g. a full disk: this video fails, the others are written
            return exc
        return VideoResult(adapter=item.adapter_path, result=result, peak_memory_bytes=peak, clip=clip,
                           encoded_prompt=self.encoded_prompts.get(item.prompt))

    def reset_trainable(self) -> None:
        """Copy the base weights back into the tuned tensors (in place: compiled graphs stay valid)."""
        with torch.no_grad(), whole_parameters(self._optimizer_step, modify=True):
            for param, initial in zip(self.params, self._initial):
                param.copy_(initial)

    def save(self, path: Path, prompt: str, result: TuneResult, state: dict[str, torch.Tensor],
             video: Path | None = None, clip: ClipInfo | None = None, *, request_hash: str | None = None) -> Path:
        """Write the adapter of `state`, the tuned tensors (whole, on the CPU), tuned on `video` (`clip`: what was
        taken from it; `request_hash`: the run's key for this video)."""
        s = self.sampling
        return save_adapter(
            path, state, base_model=self.cfg.model.model_id, fingerprint=self.fingerprint, prompt=prompt,
            steps=self.cfg.train.steps, final_loss=result.final_loss, loss=self.cfg.train.loss,
            num_frames=s.num_frames, height=s.height, width=s.width,
            extra={"seed": self.cfg.train.seed, "loss_stride": self.cfg.train.loss_stride, "reverse": s.reverse,
                   "family": self.backbone.family, "loss_weight": self.cfg.train.loss_weight,
                   "loss_formula": loss_formula(self.cfg.train.loss, self.cfg.train.loss_weight),
                   "skipped_steps": result.skipped_steps, "request_hash": request_hash},
            base=self.base, sampling=self.sampling_record(video, clip),
            encoded_prompt=self.encoded_prompts.get(prompt), dtype=self.cfg.adapter_dtype,
            base_tensors=self.base_tensors(), lora=self.lora,
        )

    def base_tensors(self) -> dict[str, torch.Tensor]:
        """The base value of every tuned tensor, by the names `trainable_state` gives (what delta adapters are
        the changes from). Packed layers hold K slices that all start at the base value: slice 0 is it."""
        names = [name for name, p in self.backbone.unet.named_parameters() if p.requires_grad]
        return dict(zip(names, (value[0] for value in self._initial) if self.pack is not None else self._initial))

    def sampling_record(self, video: Path | None, clip: ClipInfo | None = None) -> dict:
        """How frames are taken from `video`: every sampling setting of the run (all DataConfig fields but
        `videos`, sizes resolved), the source frame indices in training order (as `clip` says they were taken,
        else computed from start and stride), the video's absolute path."""
        record = {k: v for k, v in dataclasses.asdict(self.cfg.data).items() if k != "videos"}
        s = self.sampling
        frames = list(clip.frame_indices) if clip is not None else sampled_frames(s)
        record.update(num_frames=s.num_frames, height=s.height, width=s.width, frames=frames,
                      video=str(Path(video).resolve()) if video is not None else None)
        if clip is not None and clip.timing == "index":
            record["fps"] = None  # --fps was ignored (a frame folder): the frames were taken by index
        return record


def _read_latent_cache(path: Path) -> tuple[torch.Tensor, ClipInfo] | None:
    """(latents, ClipInfo) from a latent cache file, re-raising the warnings of the first read; None when absent
    (or written before the ClipInfo was stored beside the latents)."""
    if not path.is_file():
        return None
    with safe_open(path, framework="pt") as handle:
        record = (handle.metadata() or {}).get("clip")
        if record is None:
            return None
        latents = handle.get_tensor("latents")
    info = ClipInfo.from_record(json.loads(record))
    for note in info.notes:
        warnings.warn(VmcWarning(note), stacklevel=3)
    return latents, info
