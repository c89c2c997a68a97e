"""Pretrain the built-in ``toy`` model (UNet + T5, jointly) on procedural toy-world clips, and export it.

    vmc-fast toy-pretrain --out DIR --steps N [--resume] [--export [--export-dir DIR]]
    vmc-fast toy-pretrain --out DIR --export-only          # ship DIR's latest checkpoint

Every step draws a fresh batch of clips from `vmc_fast.toy.world` with the held-out motion families excluded, so
that tuning on a held-out motion later measures transfer, not memory. The batch, timesteps, noise and caption
dropout of step k depend only on (seed, k): a resumed run sees exactly the data an uninterrupted one would, and
with model, optimizer and step restored from the checkpoint it continues bit for bit.

Loss: Show-1/IF's hybrid objective. eps-MSE on the epsilon half of the output, plus the variational bound term
on the variance half with the predicted mean detached (Nichol & Dhariwal's L_hybrid), because the model is
sampled with Show-1's ``learned_range`` DDPM schedule and an untrained variance half would make that noise
arbitrary. ``--vlb-weight 0`` turns it off.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from vmc_fast.config import option
from vmc_fast.runtime import machine_description, resolve_device
from vmc_fast.toy import model as toy
from vmc_fast.toy import world

CHECKPOINT = "checkpoint.pt"
LOG_FILE = "log.jsonl"
LOSS_WEIGHTINGS = ("uniform", "v")
LR_SCHEDULES = ("constant", "cosine")
V_WEIGHT_CAP = 20.0
"""Cap of the ``v`` weighting 1 / abar_t (it reaches ~1e5 at the last timestep of Show-1's schedule)."""
SMOOTH_WINDOWS = 10
"""The exported "final loss" is the median of this many logged windows: small batches are noisy, and the VLB
term spikes when a batch draws a timestep near 0 (tiny posterior variance)."""


@dataclass
class PretrainConfig:
    """One pretraining run; saved inside every checkpoint."""

    out: str = "toy-run"
    """Run folder: checkpoint.pt, log.jsonl (and, with --export, the shipped files' source)."""
    steps: int = 3000
    """Total optimizer steps (a resumed run stops at the same total)."""
    batch_size: int = 4
    """Clips per step, rendered on the fly."""
    lr: float = 3e-4
    """AdamW peak learning rate (linear warm-up, then --lr-schedule)."""
    warmup_steps: int = 100
    """Steps of linear learning-rate warm-up from 0."""
    lr_schedule: str = "constant"
    """After warm-up: constant, or cosine (decays to --min-lr-ratio x lr at the last step of --steps)."""
    min_lr_ratio: float = 0.1
    """Where the cosine schedule ends, as a fraction of --lr."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Max global gradient norm (UNet and text encoder together)."""
    caption_dropout: float = 0.1
    """Probability of training a clip with the empty prompt (classifier-free guidance)."""
    vlb_weight: float = 1.0
    """Weight of the variance (VLB) term per timestep, in bits per dimension; 0 trains the eps half only."""
    loss_weighting: str = "uniform"
    """Per-sample weight of the eps-MSE: ``uniform``, or ``v`` = 1 / abar_t capped at V_WEIGHT_CAP (the
    v-prediction loss written for an eps model). Uniform eps-MSE gives high-noise steps, where layout, colour
    and the prompt are decided, almost no gradient (their eps error is ~30x smaller than at low noise)."""
    seed: int = 0
    """Seeds the initial weights and every step's data, timesteps, noise and caption dropout."""
    checkpoint_every: int = 100
    """Steps between atomic checkpoints (and always at the end)."""
    log_every: int = 10
    """Steps between progress lines."""
    num_frames: int = field(default=toy.NUM_FRAMES, metadata=option("--frames"))
    """Frames per clip."""
    height: int = toy.HEIGHT
    """Clip height in pixels (divisible by 4)."""
    width: int = toy.WIDTH
    """Clip width in pixels (divisible by 4)."""
    device: str = "auto"
    """"auto" (CUDA when available), "cpu" or "cuda[:i]"."""
    data_workers: int | None = None
    """Processes rendering the next batches while the model trains; default: 0 on a CPU, up to 8 with CUDA (the
    clips are rendered on the CPU, which would otherwise keep a GPU waiting). Batches depend only on (seed, step),
    so the number of workers never changes the run."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every", "log_every", "num_frames"):
            if getattr(self, name) < (0 if name == "steps" else 1):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.caption_dropout <= 1:
            raise ValueError(f"caption_dropout must be in [0, 1], got {self.caption_dropout}")
        if self.height % 4 or self.width % 4:
            raise ValueError(f"height and width must be divisible by 4 (3 UNet levels), got {self.height}x{self.width}")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting must be one of {', '.join(LOSS_WEIGHTINGS)}, got {self.loss_weighting!r}")
        if self.warmup_steps < 0 or self.vlb_weight < 0:
            raise ValueError("warmup_steps and vlb_weight must not be negative")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.data_workers is not None and self.data_workers < 0:
            raise ValueError(f"--data-workers must be 0 or more, got {self.data_workers}")


@dataclass
class TrainState:
    """Everything a checkpoint restores."""

    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    optimizer: torch.optim.Optimizer
    step: int = 0
    elapsed_s: float = 0.0
    """Training wall time summed over all sessions of the run."""
    last_loss: float = float("nan")
    """Mean loss of the last logged window."""
    history: list = field(default_factory=list)
    """Logged windows: step, loss, steps/s, elapsed."""
    commands: list = field(default_factory=list)
    """The command line of every session of the run (the first one, then each --resume)."""


# ----------------------------------------------------------------------------------------------------------------
# Data: a function of (seed, step) only


def step_seed(seed: int, step: int) -> int:
    """The seed of one step's batch; distinct for every (seed, step) pair of practical size."""
    return seed * 1_000_003 + step


def sample_specs(cfg: PretrainConfig, step: int) -> list[world.ClipSpec]:
    """The clip specs of one step: train motions only, all shapes, colours and backgrounds."""
    rng = random.Random(step_seed(cfg.seed, step))
    specs = [world.sample_spec(rng, motions=world.TRAIN_MOTIONS, num_frames=cfg.num_frames,
                                  height=cfg.height, width=cfg.width) for _ in range(cfg.batch_size)]
    assert not {s.motion for s in specs} & set(world.HELD_OUT_MOTIONS)
    return specs


def make_batch(cfg: PretrainConfig, step: int, num_timesteps: int) -> dict:
    """One step's batch on the CPU: pixels (B, 3, F, H, W) float32 in [-1, 1], captions (B strings, "" when
    dropped), timesteps (B,) int64, noise like pixels."""
    specs = sample_specs(cfg, step)
    clips = [world.render_clip(spec) for spec in specs]
    rng = random.Random(~step_seed(cfg.seed, step))
    captions = ["" if rng.random() < cfg.caption_dropout else clip.caption for clip in clips]
    gen = torch.Generator().manual_seed(step_seed(cfg.seed, step))
    pixels = torch.stack([clip.frames for clip in clips])
    return {"pixels": pixels, "captions": captions, "specs": specs,
            "timesteps": torch.randint(0, num_timesteps, (cfg.batch_size,), generator=gen),
            "noise": torch.randn(pixels.shape, generator=gen)}


# ----------------------------------------------------------------------------------------------------------------
# Loss


def _extract(values: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """values (T,) float64, t (B,) -> (B, 1, 1, 1, 1) float32 on t's device."""
    return values.to(t.device)[t].float().view(-1, 1, 1, 1, 1)


def vlb_term(scheduler, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, eps_pred: torch.Tensor,
             var_pred: torch.Tensor) -> torch.Tensor:
    """KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) in bits per dimension, (B,) float32; 0 where t == 0.

    The model mean comes from the detached eps prediction, so this term trains only the variance half. The
    variance is the ``learned_range`` interpolation diffusers' DDPMScheduler samples with.
    """
    abar = scheduler.alphas_cumprod.double()
    abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
    beta = 1 - abar / abar_prev
    post_var = beta * (1 - abar_prev) / (1 - abar)
    a, a_prev, b = _extract(abar, t), _extract(abar_prev, t), _extract(beta, t)
    min_log = _extract(torch.log(post_var.clamp(min=1e-20)), t)
    max_log = torch.log(b)
    true_mean = (a_prev.sqrt() * b * x0 + (1 - b).sqrt() * (1 - a_prev) * xt) / (1 - a)
    x0_pred = (xt - (1 - a).sqrt() * eps_pred.detach()) / a.sqrt()
    model_mean = (a_prev.sqrt() * b * x0_pred + (1 - b).sqrt() * (1 - a_prev) * xt) / (1 - a)
    frac = (var_pred + 1) / 2
    model_log = frac * max_log + (1 - frac) * min_log
    kl = 0.5 * (-1 + model_log - min_log + torch.exp(min_log - model_log)
                + (true_mean - model_mean) ** 2 * torch.exp(-model_log))
    # At t == 0 the true posterior variance is 0 (log clamped to -46): the KL is meaningless there, and the
    # sampler adds no noise at t == 0 anyway.
    return kl.flatten(1).mean(1) / math.log(2) * (t > 0).float()


def diffusion_loss(cfg: PretrainConfig, state: TrainState, scheduler, tokenizer, batch: dict,
                   device: torch.device) -> tuple[torch.Tensor, dict]:
    """Hybrid loss of one batch: weighted eps-MSE + vlb_weight * VLB; returns (scalar, {"eps": unweighted eps-MSE,
    "vlb": float})."""
    x0, noise = batch["pixels"].to(device), batch["noise"].to(device)
    t = batch["timesteps"].to(device)
    abar = _extract(scheduler.alphas_cumprod.double(), t)
    xt = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    tokens = {k: v.to(device) for k, v in toy.tokenize(tokenizer, batch["captions"]).items()}
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        text = state.text_encoder(**tokens).last_hidden_state
        out = state.unet(xt, t, text).sample.float()
    eps_pred, var_pred = out.chunk(2, dim=1)
    per_sample = (eps_pred - noise).pow(2).flatten(1).mean(1)
    weight = (1 / abar.view(-1)).clamp(max=V_WEIGHT_CAP) if cfg.loss_weighting == "v" else 1.0
    eps_loss = (per_sample * weight).mean()
    vlb = vlb_term(scheduler, x0, xt, t, eps_pred, var_pred).mean() if cfg.vlb_weight else eps_loss.new_zeros(())
    # "eps" is logged unweighted, so runs with different weightings compare
    return eps_loss + cfg.vlb_weight * vlb, {"eps": per_sample.mean().item(), "vlb": vlb.item()}


# ----------------------------------------------------------------------------------------------------------------
# Setup, checkpoints


def build_state(cfg: PretrainConfig, device: torch.device, vocab_size: int) -> TrainState:
    """Fresh UNet + text encoder (seeded default init, fp32 master weights) and their AdamW."""
    torch.manual_seed(cfg.seed)
    unet = toy.build_toy_unet().to(device).train()
    text_encoder = toy.build_toy_text_encoder(toy.toy_text_encoder_config(vocab_size)).to(device).train()
    params = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)
    return TrainState(unet, text_encoder, optimizer)


def save_checkpoint(cfg: PretrainConfig, state: TrainState) -> Path:
    """Write DIR/checkpoint.pt atomically (temporary file, then rename): a crash never leaves half a file."""
    path = Path(cfg.out) / CHECKPOINT
    tmp = path.with_suffix(".pt.tmp")
    torch.save({
        "config": asdict(cfg), "step": state.step, "elapsed_s": state.elapsed_s, "last_loss": state.last_loss,
        "history": state.history, "commands": state.commands, "machine": machine_description(),
        "unet": state.unet.state_dict(), "text_encoder": state.text_encoder.state_dict(),
        "optimizer": state.optimizer.state_dict(), "unet_config": toy.toy_unet_config(),
        "text_encoder_config": state.text_encoder.config.to_diff_dict(),
        # Data are a function of (seed, step); the global RNG states are kept for anything that draws from them.
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
    }, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(cfg: PretrainConfig, state: TrainState) -> None:
    """Restore model, text encoder, optimizer, step, time and RNG states from DIR/checkpoint.pt into `state`."""
    ckpt = torch.load(Path(cfg.out) / CHECKPOINT, map_location="cpu", weights_only=False)
    state.unet.load_state_dict(ckpt["unet"])
    state.text_encoder.load_state_dict(ckpt["text_encoder"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.step, state.elapsed_s = ckpt["step"], ckpt["elapsed_s"]
    state.last_loss, state.history = ckpt["last_loss"], ckpt["history"]
    state.commands = ckpt.get("commands", [])
    torch.set_rng_state(ckpt["rng"]["torch"])
    random.setstate(ckpt["rng"]["python"])
    if ckpt["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])


def _check_run_folder(cfg: PretrainConfig, resume: bool) -> None:
    out = Path(cfg.out)
    if (out / CHECKPOINT).exists() and not resume:
        raise ValueError(f"out: {out} already holds a checkpoint; pass --resume to continue it or choose another "
                         f"--out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# Training loop


def learning_rate(cfg: PretrainConfig, step: int) -> float:
    """The learning rate of 0-based `step`: linear warm-up, then constant or a cosine decay to min_lr_ratio x lr at
    the last step. A pure function of the step (no scheduler object): nothing extra to checkpoint."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - 1 - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _set_lr(cfg: PretrainConfig, optimizer: torch.optim.Optimizer, step: int) -> None:
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(cfg, step)


class _Batches(torch.utils.data.Dataset):
    """Step k -> make_batch(cfg, k): rendered in worker processes when asked (each batch depends only on k)."""

    def __init__(self, cfg: PretrainConfig, first_step: int, num_timesteps: int):
        self.cfg, self.first_step, self.num_timesteps = cfg, first_step, num_timesteps

    def __len__(self) -> int:
        return self.cfg.steps - self.first_step

    def __getitem__(self, index: int) -> dict:
        return make_batch(self.cfg, self.first_step + index, self.num_timesteps)


def _single_thread(_worker_id: int) -> None:
    torch.set_num_threads(1)  # the workers share the cores: one thread each


def batches(cfg: PretrainConfig, first_step: int, num_timesteps: int, device: torch.device):
    """The batches of steps first_step .. cfg.steps - 1, in order, rendered ahead by cfg.data_workers processes."""
    workers = cfg.data_workers
    if workers is None:
        workers = min(8, max(0, (os.cpu_count() or 1) - 1)) if device.type == "cuda" else 0
    loader = torch.utils.data.DataLoader(
        _Batches(cfg, first_step, num_timesteps), batch_size=None, shuffle=False, num_workers=workers,
        worker_init_fn=_single_thread if workers else None, prefetch_factor=4 if workers else None,
        persistent_workers=False)
    return iter(loader)


def _progress(cfg: PretrainConfig, state: TrainState, window: list[dict], rate: float) -> str:
    loss = sum(w["loss"] for w in window) / len(window)
    eps = sum(w["eps"] for w in window) / len(window)
    vlb = sum(w["vlb"] for w in window) / len(window)
    state.last_loss = loss
    eta_min = (cfg.steps - state.step) / max(rate, 1e-9) / 60
    return (f"step {state.step}/{cfg.steps}  loss {loss:.4f} (eps {eps:.4f}, vlb {vlb:.4f})  "
            f"{rate:.3f} steps/s  ETA {eta_min:.1f} min  elapsed {state.elapsed_s / 60:.1f} min")


def pretrain(cfg: PretrainConfig, resume: bool = False, log=print, command: str | None = None) -> TrainState:
    """Run (or continue) pretraining up to cfg.steps; returns the final state (also checkpointed).

    `command` (the invocation, for the exported README) is recorded in the checkpoint."""
    from vmc_fast.models.show1.loading import show1_scheduler

    _check_run_folder(cfg, resume)
    device = resolve_device(cfg.device)
    scheduler, tokenizer = show1_scheduler(), toy.build_toy_tokenizer()
    state = build_state(cfg, device, len(tokenizer))
    if resume and (Path(cfg.out) / CHECKPOINT).exists():
        load_checkpoint(cfg, state)
        log(f"resumed {cfg.out} at step {state.step}")
    if command:
        state.commands.append(command)
    log(f"toy pretraining: {_param_count(state.unet):,} UNet + {_param_count(state.text_encoder):,} text encoder "
        f"parameters on {device}, {torch.get_num_threads()} threads; config {json.dumps(asdict(cfg))}")
    window: list[dict] = []
    session_start, session_steps = time.perf_counter(), 0
    upcoming = batches(cfg, state.step, scheduler.config.num_train_timesteps, device)
    while state.step < cfg.steps:
        step_start = time.perf_counter()
        batch = next(upcoming)
        _set_lr(cfg, state.optimizer, state.step)
        loss, parts = diffusion_loss(cfg, state, scheduler, tokenizer, batch, device)
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [*state.unet.parameters(), *state.text_encoder.parameters()]
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        state.optimizer.step()
        state.step += 1
        state.elapsed_s += time.perf_counter() - step_start
        session_steps += 1
        window.append({"loss": loss.item(), **parts})
        if state.step % cfg.log_every == 0 or state.step == cfg.steps:
            rate = session_steps / (time.perf_counter() - session_start)
            log(_progress(cfg, state, window, rate))
            _append_log(cfg, state, window, rate)
            window = []
        if state.step % cfg.checkpoint_every == 0 or state.step == cfg.steps:
            save_checkpoint(cfg, state)
    return state


def _param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _append_log(cfg: PretrainConfig, state: TrainState, window: list[dict], rate: float) -> None:
    record = {"step": state.step, "loss": state.last_loss, "steps_per_s": rate, "elapsed_s": state.elapsed_s,
              **{key: sum(w[key] for w in window) / len(window) for key in ("eps", "vlb")}}
    state.history.append(record)
    with open(Path(cfg.out) / LOG_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# Export (the shipped files)


def export(run_dir: str | Path, dest: str | Path = toy.ASSETS_DIR, command: str | None = None) -> Path:
    """Write the shipped toy files (fp16 safetensors, config.json, README.md) from run_dir's checkpoint."""
    from safetensors.torch import save_file

    ckpt = torch.load(Path(run_dir) / CHECKPOINT, map_location="cpu", weights_only=False)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name, key in ((toy.UNET_FILE, "unet"), (toy.TEXT_ENCODER_FILE, "text_encoder")):
        half = {k: v.detach().to(torch.float16).contiguous() for k, v in ckpt[key].items()}
        save_file(half, str(dest / name), metadata={"format": "pt", "step": str(ckpt["step"])})
        (dest / name).chmod(0o644)  # safetensors writes 0600; shipped files must be readable by everyone
    recent = sorted(h["loss"] for h in ckpt["history"][-SMOOTH_WINDOWS:]) or [ckpt["last_loss"]]
    training = {"steps": ckpt["step"], "final_loss": recent[len(recent) // 2], "last_window_loss": ckpt["last_loss"],
                "wall_s": round(ckpt["elapsed_s"], 1),
                "machine": ckpt.get("machine") or machine_description(), "config": ckpt["config"],
                "commands": [command] if command else ckpt.get("commands") or [_default_command(ckpt["config"])]}
    cfg = ckpt["config"]
    config = {"unet": ckpt["unet_config"], "text_encoder": _t5_kwargs(ckpt["text_encoder_config"]),
              "num_frames": cfg["num_frames"], "height": cfg["height"], "width": cfg["width"],
              "prompt_length": toy.PROMPT_LENGTH, "training": training}
    (dest / toy.CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    (dest / "README.md").write_text(_readme(training, dest))
    return dest


def _t5_kwargs(diff_dict: dict) -> dict:
    """The T5Config fields toy.py passes, taken from a saved config (drops transformers bookkeeping keys)."""
    keys = toy.toy_text_encoder_config(0)
    return {k: diff_dict.get(k, v) for k, v in keys.items()}


def _default_command(cfg: dict) -> str:
    return (f"OMP_NUM_THREADS=1 vmc-fast toy-pretrain --out {cfg['out']} --steps {cfg['steps']} "
            f"--batch-size {cfg['batch_size']} --checkpoint-every {cfg['checkpoint_every']} --seed {cfg['seed']}")


def _readme(training: dict, dest: Path) -> str:
    newline = "\n    "
    files = "\n".join(f"- `{p.name}`: {p.stat().st_size / 1e6:.2f} MB" for p in sorted(dest.glob("*.safetensors")))
    return f"""# Shipped weights of the built-in `toy` model

A small Show-1-family keyframe UNet (pixel space, in 3 / out 6) and a small T5 encoder with a word-level
tokenizer built in code (`vmc_fast.toy.model`), pretrained jointly on procedural toy-world clips with the
held-out motions ({", ".join(world.HELD_OUT_MOTIONS)}) excluded. Loaded by `load_backbone("toy")`.

- Steps reached: {training["steps"]} (of {training["config"]["steps"]} planned), batch {training["config"]["batch_size"]}
- Final loss (the training objective: eps-MSE, weighted as the last command says, + VLB; median of the last
  {SMOOTH_WINDOWS} logged windows): {training["final_loss"]:.4f}
- Training wall time: {training["wall_s"] / 60:.1f} min
- Machine: {training["machine"]}

{files}

Reproduce (the run folder keeps an atomic checkpoint; `--resume` continues it exactly):

    {newline.join(training["commands"])}
    vmc-fast toy-pretrain --out {training["config"]["out"]} --export-only

The last command writes these files (fp16) from the run's latest checkpoint into `vmc_fast/toy/assets/weights/`
(`--export-dir` for another folder).
"""
