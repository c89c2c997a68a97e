"""A tuning session: one backbone prepared once, then any number of videos tuned with it.

Setup is a fixed sequence of named steps — load → surgery → fingerprint → frozen precision → checkpointing →
attention backend → compile; the optimizer step comes last (a plain optimizer per video, or one DeepSpeed engine
per session, see vmc_fast.tuning.steps).
Between videos only the trainable tensors are reset (copied back from a snapshot), so nothing is rebuilt and
frozen weights are never copied per video.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file

from vmc_fast.config import RunConfig
from vmc_fast.io.files import atomic_save_file
from vmc_fast.io.prompts import cached_prompt_embeddings, embedding_model_key
from vmc_fast.io.video import FrameSampling, load_clip
from vmc_fast.models.registry import Backbone, LoadOptions, load_backbone
from vmc_fast.runtime import COMPUTE_DTYPES, compute_dtype
from vmc_fast.tuning.adapters import base_fingerprint, save_adapter
from vmc_fast.tuning.loop import StepStats, TuneResult, tune
from vmc_fast.tuning.steps import OptimizerStep, TorchStep, whole_parameters
from vmc_fast.tuning.surgery import (
    SurgeryReport,
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


class TuningSession:
    """Holds the prepared backbone; `tune_video` tunes one clip and writes its adapter."""

    def __init__(self, cfg: RunConfig, device: str = "cpu",
                 make_optimizer_step: Callable[[torch.nn.Module, list], OptimizerStep] | None = None,
                 write_adapters: bool = True):
        self.cfg = cfg
        self.write_adapters = write_adapters
        self.device = torch.device(device)
        self.backbone = self._load()
        self.surgery = self._surgery()
        trainable_names = {n for n, p in self.backbone.unet.named_parameters() if p.requires_grad}
        self.fingerprint = base_fingerprint(self.backbone.unet, exclude=trainable_names)  # before any requantising
        self.precision = self._frozen_precision()
        self._checkpointing()
        self._attention_backend()
        self._compile()
        self.params = [p for p in self.backbone.unet.parameters() if p.requires_grad]
        self._initial = [p.detach().clone() for p in self.params]
        self._make_optimizer_step = make_optimizer_step or (lambda unet, params: TorchStep(params, cfg.train))
        self._optimizer_step: OptimizerStep | None = None  # the latest; it knows whether parameters are partitioned
        self.sampling = self._sampling()

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
        return prepare_for_motion_tuning(self.backbone.unet, self.cfg.model.trainable_pattern)

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
            resize=data.resize, reverse=data.reverse,
        )

    # ------------------------------------------------------------------------------------------ per video

    def prompt_embeddings(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Embeddings of all prompts of a run, computed in one encoder session (then the encoder is freed)."""
        return cached_prompt_embeddings(prompts, self._model_key(), self.cfg.cache_dir,
                                        self.backbone.load_text_encoder)

    def _model_key(self) -> str:
        return embedding_model_key(self.cfg.model.model_id, self.backbone.family)

    def load_input(self, video: Path) -> torch.Tensor:
        """The video as the UNet's input: (1, C, F, h, w) float32 on the session device.

        Latent models encode with their VAE once; the latents are cached on disk, keyed by model, file and sampling.
        """
        if self.backbone.vae is None:
            return load_clip(video, self.sampling).unsqueeze(0).to(self.device)
        cache = Path(self.cfg.cache_dir) / "latents" / f"{self._latent_key(video)}.safetensors"
        if cache.is_file():
            return load_file(cache)["latents"].to(self.device)
        pixels = load_clip(video, self.sampling).unsqueeze(0).to(self.device)
        latents = self.backbone.encode_pixels(pixels).float()
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_file({"latents": latents.cpu().contiguous()}, cache, {"video": str(video)})
        return latents

    def _latent_key(self, video: Path) -> str:
        stat = video.stat()
        parts = [self._model_key(), self.fingerprint, str(video.resolve()), str(stat.st_size), str(stat.st_mtime_ns),
                 repr(self.sampling)]
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]

    def tune_video(self, video: Path, prompt: str, text_states: torch.Tensor, adapter_path: Path,
                   on_step: Callable[[StepStats], None] | None = None, *,
                   request_hash: str | None = None) -> VideoResult:
        """Reset the tuned tensors, tune on `video`, write the adapter atomically (recording `request_hash`,
        the run's key for this video: `vmc_fast.runs.library.request_key`)."""
        clip = self.load_input(video)
        self.reset_trainable()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        unet = self.backbone.unet
        self._optimizer_step = self._make_optimizer_step(unet, self.params)
        states = text_states.unsqueeze(0).to(self.device)
        result = tune(unet, self.backbone.noise_scheduler.alphas_cumprod, clip, states, self.cfg.train,
                      self._optimizer_step, on_step)
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else 0
        with whole_parameters(self._optimizer_step):  # on every rank: under ZeRO-3 gathering is collective
            state = trainable_state(unet)
        if self.write_adapters:
            self.save(adapter_path, prompt, result, state, request_hash=request_hash)
        return VideoResult(adapter=adapter_path, result=result, peak_memory_bytes=peak)

    def reset_trainable(self) -> None:
        """Copy the base weights back into the tuned tensors (in place: compiled graphs stay valid)."""
        with torch.no_grad(), whole_parameters(self._optimizer_step, modify=True):
            for param, initial in zip(self.params, self._initial):
                param.copy_(initial)

    def save(self, path: Path, prompt: str, result: TuneResult, state: dict[str, torch.Tensor], *,
             request_hash: str | None = None) -> Path:
        """Write the adapter of `state`, the tuned tensors (whole, on the CPU)."""
        s = self.sampling
        return save_adapter(
            path, state, base_model=self.cfg.model.model_id, fingerprint=self.fingerprint, prompt=prompt,
            steps=self.cfg.train.steps, final_loss=result.final_loss, loss=self.cfg.train.loss, num_frames=s.num_frames, height=s.height,
            width=s.width, extra={"seed": self.cfg.train.seed, "loss_stride": self.cfg.train.loss_stride,
                                  "reverse": s.reverse, "family": self.backbone.family,
                                  "request_hash": request_hash},
        )
