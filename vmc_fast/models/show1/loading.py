"""Loading and saving Show-1 repositories, and the built-in Show-1 backbones.

Repository layout (hub id or local folder), as published for ``showlab/show-1-base``::

    unet/config.json                     unet/diffusion_pytorch_model[.fp16].{safetensors,bin}[.index.json]
    scheduler/scheduler_config.json      text_encoder/ (T5)      tokenizer/

Only JSON and tensors are read from a repository: nothing in it is ever executed (``.bin`` goes through
``torch.load(weights_only=True)``, transformers loads with ``trust_remote_code`` off).
"""

from __future__ import annotations

import json
import string
import warnings
import zlib
from functools import partial
from pathlib import Path

import torch
from torch import nn

from vmc_fast.errors import VmcError
from vmc_fast.models.registry import Backbone, LoadOptions, hub_file, register, register_family
from vmc_fast.models.show1.unet import Show1Config, Show1UNet3D, init_random_weights, is_show1_unet_config
from vmc_fast.models.show1.stages import show1_cascade, tiny_cascade

PROMPT_LENGTH = 77
"""Show-1 (like DeepFloyd IF) encodes every prompt to exactly 77 T5 tokens."""
WEIGHTS_STEM = "diffusion_pytorch_model"
SHOW1_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "beta_start": 0.0001, "beta_end": 0.02,
    "variance_type": "learned_range", "prediction_type": "epsilon", "clip_sample": True, "clip_sample_range": 1.0,
    "thresholding": True, "dynamic_thresholding_ratio": 0.95, "sample_max_value": 1.5,
}
"""Show-1's (IF-I's) DDPM settings, used for the built-ins; real repositories use their own file's values."""


# ----------------------------------------------------------------------------------------------------------------
# Where the files come from


class _Source:
    """A Show-1 repository: a local folder or a hub id; `path` gives a local file for a relative name."""

    def __init__(self, model_id: str):
        self.model_id = model_id
        folder = Path(model_id).expanduser()
        self.folder = folder if folder.is_dir() else None
        self._hub_files: set[str] | None = None

    def exists(self, rel: str) -> bool:
        if self.folder is not None:
            return (self.folder / rel).is_file()
        return rel in self._list_hub()

    def path(self, rel: str) -> Path:
        if self.folder is None:
            return Path(hub_file(self.model_id, rel))
        path = self.folder / rel
        if not path.is_file():
            raise VmcError(f"model {self.model_id!r}: {rel} is missing; expected a Show-1 repository layout "
                           f"(unet/, scheduler/, text_encoder/, tokenizer/)")
        return path

    def subfolder_args(self, sub: str) -> tuple[str, dict]:
        """(location, kwargs) for a transformers ``from_pretrained`` of one subfolder."""
        if self.folder is not None:
            return str(self.folder / sub), {}
        return self.model_id, {"subfolder": sub}

    def _list_hub(self) -> set[str]:
        if self._hub_files is None:
            from huggingface_hub import list_repo_files

            try:
                self._hub_files = set(list_repo_files(self.model_id))
            except Exception as exc:  # network, auth or a missing repository all end the same way
                raise VmcError(f"model {self.model_id!r}: could not list the hub repository "
                               f"({type(exc).__name__}); check the id and your network, or download it and pass "
                               f"the local folder") from exc
        return self._hub_files


def _weight_file_names(prefer_half: bool) -> list[str]:
    """Candidate weight files, most wanted first: safetensors before .bin, single file before shards."""
    suffixes = ("safetensors", "safetensors.index.json", "bin", "bin.index.json")
    full = [f"unet/{WEIGHTS_STEM}.{s}" for s in suffixes]
    half = [f"unet/{WEIGHTS_STEM}.fp16.{s}" for s in suffixes]
    return half + full if prefer_half else full + half


def _weight_files(source: _Source, prefer_half: bool) -> list[Path]:
    """Local paths of the UNet weights (several when sharded)."""
    for rel in _weight_file_names(prefer_half):
        if not source.exists(rel):
            continue
        if not rel.endswith(".index.json"):
            return [source.path(rel)]
        weight_map = json.loads(source.path(rel).read_text())["weight_map"]
        return [source.path(f"unet/{shard}") for shard in sorted(set(weight_map.values()))]
    raise VmcError(f"model {source.model_id!r}: no UNet weights found; expected one of "
                   f"{', '.join(_weight_file_names(False))}")


# ----------------------------------------------------------------------------------------------------------------
# UNet


def _read_tensors(path: Path, dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    """One weight file -> {name: tensor} already in `dtype` on `device`, one tensor at a time (no full copy)."""
    if path.name.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device=str(device)) as f:
            return {name: f.get_tensor(name).to(dtype) for name in f.keys()}
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
        state = torch.load(path, map_location="cpu", weights_only=True)
    return {name: t.to(device=device, dtype=dtype) for name, t in state.items()}


def _check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], model_id: str) -> None:
    """VmcError naming counts and examples when keys or shapes differ from the model's."""
    expected = {name: t.shape for name, t in model.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise VmcError(f"model {model_id!r}: UNet weights do not fit unet/config.json: {len(missing)} missing "
                       f"(e.g. {', '.join(missing[:3]) or '-'}), {len(unexpected)} unexpected (e.g. "
                       f"{', '.join(unexpected[:3]) or '-'}); check that the folder is a complete Show-1 "
                       f"repository whose config matches its weights")
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(s)}" for k, s in expected.items() if state[k].shape != s]
    if wrong:
        raise VmcError(f"model {model_id!r}: {len(wrong)} UNet weights have the wrong shape (e.g. "
                       f"{'; '.join(wrong[:3])}); the config does not describe these weights")


def load_show1_unet(model_id: str, options: LoadOptions | None = None, *, config: dict | None = None) -> Show1UNet3D:
    """Show-1 UNet from a hub id or local folder, in options.dtype on options.device, in eval mode.

    Built on the meta device and filled with ``load_state_dict(assign=True)``: the weights exist once in memory.
    """
    options = options or LoadOptions()
    source = _Source(model_id)
    config = config if config is not None else json.loads(source.path("unet/config.json").read_text())
    try:
        show1_config = Show1Config.from_dict(config)
    except ValueError as exc:
        raise VmcError(f"model {model_id!r}: unet/config.json: {exc}") from exc
    with torch.device("meta"):
        unet = Show1UNet3D(show1_config)
    prefer_half = options.dtype in (torch.float16, torch.bfloat16)
    state: dict[str, torch.Tensor] = {}
    for path in _weight_files(source, prefer_half):
        state.update(_read_tensors(path, options.dtype, options.device))
    _check_state_dict(unet, state, model_id)
    unet.load_state_dict(state, assign=True)
    return unet.eval()


# ----------------------------------------------------------------------------------------------------------------
# Scheduler and text encoder


def show1_scheduler(config: dict | None = None):
    """A diffusers DDPMScheduler with Show-1's settings (or those of `config`, a scheduler_config.json)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(dict(config) if config is not None else SHOW1_SCHEDULER_CONFIG)


def load_show1_scheduler(model_id: str):
    """DDPMScheduler from ``scheduler/scheduler_config.json`` (its values; the class is always DDPM)."""
    config = json.loads(_Source(model_id).path("scheduler/scheduler_config.json").read_text())
    return show1_scheduler(config)


class T5PromptEncoder:
    """Prompts -> (B, 77, D) float32 T5 states; padding to 77 and the attention mask as in Show-1/IF.

    Callers encode "" for the unconditional (classifier-free guidance) branch.
    """

    def __init__(self, tokenizer, encoder: nn.Module, max_length: int = PROMPT_LENGTH):
        self.tokenizer, self.encoder, self.max_length = tokenizer, encoder.eval(), max_length

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> torch.Tensor:
        batch = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length, truncation=True,
                               return_tensors="pt")
        device = next(self.encoder.parameters()).device
        out = self.encoder(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device))
        return out.last_hidden_state.float()


def _encoder_kwargs(device: str, dtype: torch.dtype, load_in_8bit: bool) -> dict:
    if load_in_8bit and torch.cuda.is_available() and str(device).startswith("cuda"):
        from transformers import BitsAndBytesConfig

        return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True), "device_map": {"": str(device)}}
    if load_in_8bit:
        warnings.warn("8-bit text encoder needs CUDA (bitsandbytes); loading it unquantised instead", stacklevel=3)
    return {"dtype": dtype}


def load_show1_text_encoder(model_id: str, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                            load_in_8bit: bool = False) -> T5PromptEncoder:
    """T5 encoder (``text_encoder/``) and tokenizer (``tokenizer/``) of a Show-1 repository as a prompt encoder.

    load_in_8bit uses bitsandbytes and applies only on CUDA (warns and falls back otherwise).
    """
    from transformers import AutoTokenizer, T5EncoderModel

    source = _Source(model_id)
    kwargs = _encoder_kwargs(device, dtype, load_in_8bit)
    try:
        location, sub = source.subfolder_args("tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(location, **sub)
        location, sub = source.subfolder_args("text_encoder")
        encoder = T5EncoderModel.from_pretrained(location, **sub, **kwargs)
    except (OSError, ValueError) as exc:
        raise VmcError(f"model {model_id!r}: could not load the T5 text encoder/tokenizer ({exc}); the repository "
                       f"needs text_encoder/ and tokenizer/ folders, or pass cached prompt embeddings") from exc
    if "quantization_config" not in kwargs:
        encoder = encoder.to(device)
    return T5PromptEncoder(tokenizer, encoder)


class RandomPromptEncoder:
    """Stand-in for T5-XXL in benchmarks: (B, 77, dim) N(0,1) states seeded per prompt. Not a text model."""

    def __init__(self, dim: int, device: str = "cpu", seed: int = 0, length: int = PROMPT_LENGTH):
        self.dim, self.device, self.seed, self.length = dim, device, seed, length
        warnings.warn("show1-base-arch has no text encoder: prompts map to random states (benchmarks only)",
                      stacklevel=3)

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        states = []
        for prompt in prompts:
            gen = torch.Generator().manual_seed(self.seed + zlib.crc32(prompt.encode()))
            states.append(torch.randn(self.length, self.dim, generator=gen))
        return torch.stack(states).to(self.device)


# ----------------------------------------------------------------------------------------------------------------
# Saving (original layout)


def save_show1_pretrained(folder: str | Path, unet: Show1UNet3D, *, scheduler=None, text_encoder=None,
                          tokenizer=None, variant: str | None = None, safe_serialization: bool = True) -> Path:
    """Write a Show-1 repository layout that `load_show1_unet` (and the original code) can read.

    variant "fp16" stores float16 tensors under ``diffusion_pytorch_model.fp16.*``.
    """
    folder = Path(folder)
    (folder / "unet").mkdir(parents=True, exist_ok=True)
    (folder / "unet" / "config.json").write_text(json.dumps(unet.config.to_dict(), indent=2) + "\n")
    dtype = torch.float16 if variant == "fp16" else None
    state = {k: v.detach().to(dtype=dtype or v.dtype, device="cpu").contiguous() for k, v in unet.state_dict().items()}
    name = WEIGHTS_STEM + (f".{variant}" if variant else "") + (".safetensors" if safe_serialization else ".bin")
    if safe_serialization:
        from safetensors.torch import save_file

        save_file(state, str(folder / "unet" / name), metadata={"format": "pt"})
    else:
        torch.save(state, folder / "unet" / name)
    for sub, part in (("scheduler", scheduler), ("text_encoder", text_encoder), ("tokenizer", tokenizer)):
        if part is not None:
            part.save_pretrained(str(folder / sub))
    return folder


# ----------------------------------------------------------------------------------------------------------------
# Backbones


def load_show1_backbone(model_id: str, unet_config: dict, options: LoadOptions) -> Backbone:
    """Family loader for a Show-1 repository (hub id or local folder)."""
    unet = load_show1_unet(model_id, options, config=unet_config)
    load_in_8bit = bool(getattr(options, "text_encoder_8bit", False))
    return Backbone(
        model_id=model_id, family="show1", unet=unet, noise_scheduler=load_show1_scheduler(model_id),
        load_text_encoder=partial(load_show1_text_encoder, model_id, device=options.device, dtype=options.dtype,
                                  load_in_8bit=load_in_8bit),
        num_frames=8, height=40, width=64, cascade=show1_cascade(options))


TINY_SEED = 0
TINY_WORDS = ("a an the is are of in on at and with to by his her its it flying walking running jumping "
              "swimming dancing bird dog cat horse car man woman person boat plane fish ball video slowly fast "
              "left right up down forward").split()


def tiny_show1_unet_config() -> dict:
    """A small Show-1 keyframe config (same block types and flags as the base model), T5 width 32."""
    config = Show1Config().to_dict()
    config.update({
        "block_out_channels": [32, 64], "layers_per_block": 1, "attention_head_dim": 8, "norm_num_groups": 8,
        "encoder_hid_dim": 32, "cross_attention_dim": 64, "addition_embed_type_num_heads": 4, "sample_size": None,
        "down_block_types": ["ResnetDownsampleBlock3D", "SimpleCrossAttnDownBlock3D"],
        "up_block_types": ["SimpleCrossAttnUpBlock3D", "ResnetUpsampleBlock3D"],
    })
    return config


def build_tiny_tokenizer():
    """A deterministic WordPiece tokenizer built in code (T5-style: lowercase, ``</s>`` appended, pad id 0).

    Known words are single tokens; other words fall back to characters, so different prompts stay different.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = string.ascii_lowercase + string.digits
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for token in [*chars, *string.punctuation, *("##" + c for c in chars), *TINY_WORDS]:
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(models.WordPiece(vocab, unk_token="<unk>", max_input_chars_per_word=100))
    tok.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.StripAccents(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=PROMPT_LENGTH)


def build_tiny_text_encoder(vocab_size: int, seed: int = TINY_SEED) -> nn.Module:
    """A 2-layer T5 encoder of width 32 with seeded random weights."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
                      feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    with torch.random.fork_rng(devices=[]):  # seed locally; leave the caller's RNG untouched
        torch.manual_seed(seed)
        return T5EncoderModel(config).eval()


def _tiny_prompt_encoder(device: str) -> T5PromptEncoder:
    tokenizer = build_tiny_tokenizer()
    return T5PromptEncoder(tokenizer, build_tiny_text_encoder(len(tokenizer)).to(device))


def build_tiny_random_unet(seed: int = TINY_SEED) -> Show1UNet3D:
    """The show1-tiny-random keyframe UNet (fp32, CPU), identical for a given seed."""
    return init_random_weights(Show1UNet3D.from_config(tiny_show1_unet_config()), seed).eval()


def build_tiny_random_backbone(options: LoadOptions) -> Backbone:
    """``show1-tiny-random``: tiny random keyframe UNet, tiny T5, Show-1 DDPM; 8 frames at 16x24.

    Its cascade has tiny random interpolation, IF-II and super-resolution stages (29 frames at 96x144).
    """
    unet = build_tiny_random_unet().to(device=options.device, dtype=options.dtype)
    return Backbone(model_id="show1-tiny-random", family="show1", unet=unet, noise_scheduler=show1_scheduler(),
                    load_text_encoder=partial(_tiny_prompt_encoder, options.device),
                    num_frames=8, height=16, width=24, cascade=tiny_cascade(options))


def build_base_arch_backbone(options: LoadOptions) -> Backbone:
    """``show1-base-arch``: the full base architecture with random weights, for speed and memory benchmarks.

    Built on the meta device and materialised once on options.device (no CPU copy for CUDA runs). With
    device "meta" the weights stay unmaterialised (shape-only uses such as FLOP counting).
    """
    with torch.device("meta"):
        unet = Show1UNet3D(Show1Config()).to(options.dtype)
    if str(options.device) != "meta":
        unet = init_random_weights(unet.to_empty(device=options.device), seed=0)
    return Backbone(model_id="show1-base-arch", family="show1", unet=unet.eval(), noise_scheduler=show1_scheduler(),
                    load_text_encoder=partial(RandomPromptEncoder, 4096, options.device),
                    num_frames=8, height=40, width=64, benchmark_only=True)


register_family("show1", is_show1_unet_config, load_show1_backbone)
register("show1-tiny-random", build_tiny_random_backbone,
         "tiny random Show-1 family: keyframe UNet, tiny T5, interpolation and super-resolution stages (CPU tests "
         "and smoke runs, no download)")
register("show1-base-arch", build_base_arch_backbone,
         "full Show-1 base architecture with random weights (benchmarks only; random text states)")
