"""The built-in ``toy`` text-to-video model: a small Show-1 keyframe UNet + small T5, trained on the toy world.

It is the same family as Show-1 (pixel space, in 3 / out 6 learned variance, Show-1's DDPM schedule, T5 text
states), so motion tuning, inversion and sampling run through exactly the code paths of the real model, but it
is small enough to pretrain in minutes on one GPU (`vmc-fast toy-pretrain`) and to ship its weights
inside the package (``vmc_fast/toy/assets/weights/``, fp16, a few MB). It knows the toy world's vocabulary only.

Shipped folder (or ``$VMC_FAST_TOY_DIR``)::

    config.json                 {"unet": Show-1 unet config, "text_encoder": T5Config dict, "vocab_size", ...}
    unet.safetensors            fp16 Show1UNet3D state_dict
    text_encoder.safetensors    fp16 T5EncoderModel state_dict
    README.md                   how these files were produced (command, steps, loss, time, machine)

Importing this module registers the ``toy`` built-in with the backbone registry.
"""

from __future__ import annotations

import json
import os
import warnings
from functools import partial
from pathlib import Path

import torch
from torch import nn

from vmc_fast.errors import VmcError, VmcWarning
from vmc_fast.models.registry import Backbone, LoadOptions, ModelSpec, register, spec_from_configs
from vmc_fast.models.show1.unet import Show1Config, Show1UNet3D
from vmc_fast.models.tiny import PROMPT_LENGTH, T5_SPECIAL_TOKENS, t5_style_tokenizer

TOY_DIR_ENV = "VMC_FAST_TOY_DIR"
"""Environment variable naming a folder that replaces the shipped ``vmc_fast/toy/assets/weights/`` (tests, new runs)."""
ASSETS_DIR = Path(__file__).resolve().parent / "assets" / "weights"
"""Where the shipped toy weights live inside the package."""
CONFIG_FILE, UNET_FILE, TEXT_ENCODER_FILE = "config.json", "unet.safetensors", "text_encoder.safetensors"
NUM_FRAMES, HEIGHT, WIDTH = 8, 32, 32
"""Clip size the toy model is trained on (the UNet needs H and W divisible by 4)."""
PRETRAIN_COMMAND = "vmc-fast toy-pretrain --out DIR --steps N --export"


# ----------------------------------------------------------------------------------------------------------------
# Architecture


def toy_unet_config() -> dict:
    """Show-1 keyframe config at toy size: 3 levels (32, 64, 64), one layer per block, T5 width 64.

    Channels are multiples of 32 (temporal convs and the text GroupNorm hard-code 32 groups). attention_head_dim
    8 gives the temporal attention 8 heads (of 4 / 8 channels), as Show-1 reads that key as a head count there.
    """
    config = Show1Config().to_dict()
    config.update({
        "block_out_channels": [32, 64, 64], "layers_per_block": 1, "attention_head_dim": 8,
        "encoder_hid_dim": 64, "cross_attention_dim": 64, "addition_embed_type_num_heads": 4,
        "sample_size": HEIGHT,
        "down_block_types": ["ResnetDownsampleBlock3D", "SimpleCrossAttnDownBlock3D", "SimpleCrossAttnDownBlock3D"],
        "up_block_types": ["SimpleCrossAttnUpBlock3D", "SimpleCrossAttnUpBlock3D", "ResnetUpsampleBlock3D"],
    })
    return config


def toy_text_encoder_config(vocab_size: int) -> dict:
    """T5Config keyword arguments of the toy text encoder: width 64, 3 layers, 4 heads, no dropout."""
    return dict(vocab_size=vocab_size, d_model=64, d_kv=16, d_ff=128, num_layers=3, num_heads=4,
                relative_attention_num_buckets=16, relative_attention_max_distance=32, dropout_rate=0.0,
                feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


def build_toy_unet(config: dict | None = None) -> Show1UNet3D:
    """A toy UNet with PyTorch's default init (callers seed the global RNG); fp32, CPU, train mode."""
    return Show1UNet3D.from_config(config or toy_unet_config())


def build_toy_text_encoder(config: dict | None = None) -> nn.Module:
    """A T5EncoderModel from `toy_text_encoder_config` kwargs (default: for the toy vocabulary); fp32, CPU."""
    from transformers import T5Config, T5EncoderModel

    config = config or toy_text_encoder_config(len(toy_vocabulary()))
    return T5EncoderModel(T5Config(**config))


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer


def toy_vocabulary() -> list[str]:
    """Special tokens, then every (lower-case) word of every toy caption, sorted: ids never depend on order of
    iteration, and each caption word is one token."""
    from vmc_fast.toy import world as tw

    words: set[str] = set()
    for shape in tw.SHAPES:
        for colour in tw.COLOURS:
            for background in tw.BACKGROUNDS:
                for motion in tw.MOTION_FAMILIES:
                    spec = tw.ClipSpec(shape=shape, colour=colour, background=background, motion=motion)
                    for caption in tw.captions(spec):
                        words.update(_split_words(caption))
    return [*T5_SPECIAL_TOKENS, *sorted(words - set(T5_SPECIAL_TOKENS))]


def _split_words(text: str) -> list[str]:
    """The words the tokenizer's Whitespace pre-tokenizer sees (\\w+ runs and punctuation runs)."""
    from tokenizers.pre_tokenizers import Whitespace

    return [word for word, _ in Whitespace().pre_tokenize_str(text.lower())]


def build_toy_tokenizer():
    """Word-level tokenizer over `toy_vocabulary` (lower-case, ``</s>`` appended, pad 0); unknown words -> <unk>."""
    return t5_style_tokenizer(toy_vocabulary(), subwords=False)


def tokenize(tokenizer, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Prompts -> {"input_ids", "attention_mask"}: (B, 77) int64 each, padded as T5PromptEncoder does.

    A caption longer than 77 tokens is cut there, as T5PromptEncoder cuts it; a VmcWarning names the dropped end.
    """
    from vmc_fast.io.prompts import token_report

    for prompt in prompts:
        report = token_report(tokenizer, prompt, PROMPT_LENGTH)
        if report.truncated:
            warnings.warn(VmcWarning(f"toy caption {prompt[:40]!r}... is {report.num_tokens} tokens; the toy text "
                                     f"encoder reads {PROMPT_LENGTH}, so {report.dropped!r} is dropped"),
                          stacklevel=2)
    batch = tokenizer(list(prompts), padding="max_length", max_length=PROMPT_LENGTH, truncation=True,
                      return_tensors="pt")
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


# ----------------------------------------------------------------------------------------------------------------
# Shipped weights


def toy_dir() -> Path:
    """The folder the ``toy`` loader reads: ``$VMC_FAST_TOY_DIR`` when set, else the package's assets."""
    override = os.environ.get(TOY_DIR_ENV)
    return Path(override).expanduser() if override else ASSETS_DIR


def _require(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.is_file():
        raise VmcError(f"model 'toy': {path} is missing; produce the toy weights with `{PRETRAIN_COMMAND}` "
                       f"(exports into {ASSETS_DIR}), or point ${TOY_DIR_ENV} at a folder holding "
                       f"{CONFIG_FILE}, {UNET_FILE} and {TEXT_ENCODER_FILE}")
    return path


def read_toy_config(folder: Path | None = None) -> dict:
    """Parsed config.json of the toy folder; VmcError with the fix when it is missing."""
    return json.loads(_require(folder or toy_dir(), CONFIG_FILE).read_text())


def _load_into(model: nn.Module, path: Path, dtype: torch.dtype, device: str) -> nn.Module:
    """Fill a meta-device model from a safetensors file (weights exist once), checking names and shapes."""
    from safetensors.torch import load_file

    state = {k: v.to(device=device, dtype=dtype) for k, v in load_file(str(path)).items()}
    expected = {k: v.shape for k, v in model.state_dict().items()}
    got = {k: v.shape for k, v in state.items()}
    if expected != got:
        diff = sorted(set(expected.items()) ^ set(got.items()))[:3]
        raise VmcError(f"model 'toy': {path} does not fit {CONFIG_FILE} (e.g. {diff}); re-export the weights "
                       f"with `{PRETRAIN_COMMAND}`")
    model.load_state_dict(state, assign=True, strict=True)
    return model.eval()


def load_toy_unet(folder: Path | None = None, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Show1UNet3D:
    """The shipped toy UNet in `dtype` on `device`, eval mode."""
    folder = folder or toy_dir()
    config = read_toy_config(folder)
    weights = _require(folder, UNET_FILE)
    with torch.device("meta"):
        unet = Show1UNet3D.from_config(config["unet"])
    return _load_into(unet, weights, dtype, device)


def load_toy_prompt_encoder(folder: Path | None = None, device: str = "cpu"):
    """The shipped toy tokenizer + T5 encoder as a prompt encoder: list of B prompts -> (B, 77, 64) float32."""
    from transformers import T5Config, T5EncoderModel

    from vmc_fast.models.show1.text_encoder import T5PromptEncoder

    folder = folder or toy_dir()
    config = read_toy_config(folder)
    tokenizer = build_toy_tokenizer()
    if len(tokenizer) != config["text_encoder"]["vocab_size"]:
        raise VmcError(f"model 'toy': the toy world's vocabulary ({len(tokenizer)} words) differs from the one "
                       f"the shipped text encoder was trained on ({config['text_encoder']['vocab_size']}); "
                       f"retrain with `{PRETRAIN_COMMAND}`")
    with torch.device("meta"):
        encoder = T5EncoderModel(T5Config(**config["text_encoder"]))
    # fp32 always: the encoder is tiny, runs once per prompt and is freed before training.
    encoder = _load_into(encoder, _require(folder, TEXT_ENCODER_FILE), torch.float32, device)
    return T5PromptEncoder(tokenizer, encoder, max_length=PROMPT_LENGTH)


def load_toy_backbone(options: LoadOptions) -> Backbone:
    """``toy``: the shipped toy keyframe UNet + T5 + Show-1 DDPM schedule; 8 frames at 32x32."""
    from vmc_fast.models.show1.loading import show1_scheduler

    folder = toy_dir()
    config = read_toy_config(folder)
    unet = load_toy_unet(folder, options.dtype, options.device)
    return Backbone(model_id="toy", family="show1", unet=unet, noise_scheduler=show1_scheduler(),
                    load_text_encoder=partial(load_toy_prompt_encoder, folder, options.device),
                    num_frames=config.get("num_frames", NUM_FRAMES), height=config.get("height", HEIGHT),
                    width=config.get("width", WIDTH))


def toy_spec() -> ModelSpec:
    """The toy model's spec from its config.json (no weights read); Show-1's schedule."""
    from vmc_fast.models.show1.loading import SHOW1_SCHEDULER_CONFIG

    config = read_toy_config()
    return spec_from_configs("toy", "show1", config["unet"], None, SHOW1_SCHEDULER_CONFIG,
                             num_frames=config.get("num_frames", NUM_FRAMES), height=config.get("height", HEIGHT),
                             width=config.get("width", WIDTH))


register("toy", load_toy_backbone,
         "small Show-1-family model pretrained on the toy world (shipped weights; see vmc_fast/toy/assets/weights/README.md)",
         spec=toy_spec)
