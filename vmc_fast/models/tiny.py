"""Tiny models and tokenizers built in code, for tests and smoke runs: no download, seeded, identical every time.

The one place for them: the built-in ``tiny-random`` (diffusers UNet3D), ``animatediff-tiny-random`` and
``show1-tiny-random`` backbones, the tiny stages of Show-1's cascade, and the toy model's tokenizer are all built
from the pieces here.
"""

from __future__ import annotations

import string

import torch
from torch import nn

PROMPT_LENGTH = 77
"""Prompts are padded to 77 tokens, as CLIP, Show-1 and IF do."""
T5_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")
"""T5 conventions: pad id 0, end-of-sequence id 1, unknown id 2."""
TINY_WORDS = ("a an the is are of in on at and with to by his her its it flying walking running jumping "
              "swimming dancing bird dog cat horse car man woman person boat plane fish ball video slowly fast "
              "left right up down forward").split()
"""Whole-word tokens of the tiny Show-1 tokenizer; other words fall back to characters."""

DIFFUSERS_SEED = 20231201
"""Seed of the tiny-random UNet3D and VAE (its CLIP text encoder uses the next one)."""
UNET3D_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
    up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    norm_num_groups=32,  # the temporal conv layers hard-code 32 groups, so channels are multiples of 32
    cross_attention_dim=32,
    attention_head_dim=8,
)
"""diffusers UNet3DConditionModel kwargs of tiny-random (and of the tiny sr2 stage, with another sample size)."""
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(16, 32),
    latent_channels=4,
    norm_num_groups=8,
    sample_size=32,
)
"""diffusers AutoencoderKL kwargs of tiny-random: 2x spatial downsampling, 4 latent channels."""
ANIMATEDIFF_SEED = 20241201
"""Seed of the animatediff-tiny-random SD UNet, motion adapter and VAE (its CLIP text encoder uses the next one)."""
SD_UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    norm_num_groups=8,
    cross_attention_dim=32,
    attention_head_dim=8,
)
"""diffusers UNet2DConditionModel kwargs of animatediff-tiny-random's Stable Diffusion part (its VAE: VAE_CONFIG)."""
MOTION_ADAPTER_CONFIG = dict(
    block_out_channels=(32, 64),
    motion_layers_per_block=1,
    motion_num_attention_heads=4,
    motion_norm_num_groups=8,
    motion_max_seq_length=32,
    use_motion_mid_block=True,
)
"""diffusers MotionAdapter kwargs of animatediff-tiny-random: one motion module per block, a mid-block one (as in
AnimateDiff v2 and v1-5-2), up to 32 frames."""
CLIP_TEXT_CONFIG = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
)
"""transformers CLIPTextConfig kwargs of the tiny CLIP text encoder (the vocabulary comes from its tokenizer)."""


def t5_style_tokenizer(vocabulary: list[str], *, subwords: bool):
    """A fast tokenizer over `vocabulary` (its first entries T5_SPECIAL_TOKENS), T5-style: lower-case, ``</s>``
    appended, padded with id 0 to PROMPT_LENGTH.

    subwords=False: whole words only (WordLevel on whitespace and punctuation runs), unknown words -> <unk>.
    subwords=True: WordPiece; words missing from the vocabulary fall back to the characters and ``##`` pieces it
    holds, so different prompts stay different (accents stripped first).
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {word: index for index, word in enumerate(vocabulary)}
    if subwords:
        tok = Tokenizer(models.WordPiece(vocab, unk_token="<unk>", max_input_chars_per_word=100))
        tok.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.StripAccents(),
                                               normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    else:
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.normalizer = normalizers.Lowercase()
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=PROMPT_LENGTH)


def show1_tokenizer():
    """The tiny Show-1 tokenizer: TINY_WORDS as whole tokens, characters and ``##`` pieces for everything else."""
    chars = string.ascii_lowercase + string.digits
    vocabulary = list(T5_SPECIAL_TOKENS)
    for token in [*chars, *string.punctuation, *("##" + c for c in chars), *TINY_WORDS]:
        if token not in vocabulary:
            vocabulary.append(token)
    return t5_style_tokenizer(vocabulary, subwords=True)


def t5_encoder(vocab_size: int, seed: int = 0, *, d_model: int = 32, d_kv: int = 8, d_ff: int = 64,
               num_layers: int = 2, num_heads: int = 4, relative_attention_num_buckets: int = 8) -> nn.Module:
    """A T5 encoder with seeded random weights (default: 2 layers of width 32), eval mode, fp32, CPU.

    The caller's random state is left untouched.
    """
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=num_layers,
                      num_heads=num_heads, relative_attention_num_buckets=relative_attention_num_buckets,
                      relative_attention_max_distance=32, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return T5EncoderModel(config).eval()


def clip_tokenizer():
    """A CLIP byte-level BPE tokenizer with no merges (one token per byte), built in memory."""
    from transformers import CLIPTokenizer

    symbols = [chr(b) if 33 <= b <= 126 else chr(256 + b) for b in range(256)]
    vocab = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    # 77 as CLIP's own: diffusers pipelines pad to model_max_length (they overflow on the default, about 1e30)
    return CLIPTokenizer(vocab={tok: i for i, tok in enumerate(vocab)}, merges=[], model_max_length=PROMPT_LENGTH)


def clip_text_encoder(tokenizer, seed: int = DIFFUSERS_SEED + 1) -> nn.Module:
    """A CLIP text model of CLIP_TEXT_CONFIG for `tokenizer`'s vocabulary, seeded (sets the global seed, as the
    tiny-random backbone always has)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                            **CLIP_TEXT_CONFIG)
    return CLIPTextModel(config)


def show1_unet_config() -> dict:
    """A small Show-1 keyframe config (the base model's block types and flags), T5 width 32, 2 levels."""
    from vmc_fast.models.show1.unet import Show1Config

    config = Show1Config().to_dict()
    config.update({
        "block_out_channels": [32, 64], "layers_per_block": 1, "attention_head_dim": 8, "norm_num_groups": 8,
        "encoder_hid_dim": 32, "cross_attention_dim": 64, "addition_embed_type_num_heads": 4, "sample_size": None,
        "down_block_types": ["ResnetDownsampleBlock3D", "SimpleCrossAttnDownBlock3D"],
        "up_block_types": ["SimpleCrossAttnUpBlock3D", "ResnetUpsampleBlock3D"],
    })
    return config
