"""Show-1's prompt encoder: T5 states of 77 tokens per prompt, loaded from a repository's text_encoder/ and
tokenizer/; and the random stand-in the base-architecture benchmark uses instead of T5-XXL."""

from __future__ import annotations

import warnings
import zlib

import torch
from torch import nn

from vmc_fast.errors import VmcError
from vmc_fast.io.prompts import TokenReport, token_report
from vmc_fast.models.show1.loading import RepositorySource

PROMPT_LENGTH = 77
"""Show-1 (like DeepFloyd IF) encodes every prompt to exactly 77 T5 tokens."""


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

    def encoded_text(self, prompt: str) -> TokenReport:
        """How much of `prompt` __call__ encodes: prompts longer than max_length tokens are cut there."""
        return token_report(self.tokenizer, prompt, self.max_length)


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

    source = RepositorySource(model_id)
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
