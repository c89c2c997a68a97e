"""LoRA on the temporal attention Q/K/V, through PEFT (``--lora-rank R``, ``--lora-alpha A``).

The target modules are exactly the linear layers whose weights full tuning would tune (the backbone's
`trainable_pattern`, or ``--trainable``): PEFT's `inject_adapter_in_model` wraps each in a `peft.tuners.lora.Linear`
in place, so the module tree keeps its names and the frozen weight moves to ``<module>.base_layer.weight``. A layer
then computes ``W x + (alpha / r) B A x`` with A float32 (r, in) and B float32 (out, r).

Adapter files name the factors as PEFT saves them (`peft.get_peft_model_state_dict`, adapter name dropped):
``<module>.lora_A.weight`` and ``<module>.lora_B.weight``, where ``<module>`` is the base model's module name (e.g.
``down_blocks.0.temp_attentions.0.transformer_blocks.0.attn1.to_q``); rank and alpha travel in the metadata. The
frozen base weights are identified under the base model's own names (`base_name`), so an injected model and a plain
one have the same fingerprint.

Initialisation is PEFT's (A Kaiming-uniform as nn.Linear's default, B zero, so training starts at the base model)
but drawn from a generator seeded with the run's seed, in module-name order: every video of a session starts from
the same factors, whatever its position, and the global RNG is left alone.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from vmc_fast.errors import VmcError

ADAPTER_NAME = "default"
"""The PEFT adapter name of the injected layers (PEFT's default; it never appears in adapter files)."""
LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<part>[AB])\.weight")
"""An adapter file's LoRA key: ``<module>.lora_A.weight`` (A, (r, in)) or ``<module>.lora_B.weight`` (B, (out, r))."""
_PEFT_PARAM = re.compile(r"\.lora_(?P<part>[AB])\." + ADAPTER_NAME + r"\.weight$")
_ATTRIBUTE = "_vmc_lora"


@dataclass(frozen=True)
class LoraSettings:
    """Rank and alpha of one LoRA."""

    rank: int
    """r: rows of every A, columns of every B."""
    alpha: float
    """The layer's change is (alpha / r) B A."""

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def lora_targets(unet: nn.Module, names: list[str], option: str = "--trainable") -> list[str]:
    """Module names of the parameters `names` (``<module>.weight``), sorted; VmcError naming `option` when one is
    not the weight of an nn.Linear (LoRA here adapts linear layers only: a bias, a convolution or a norm cannot be
    a target)."""
    modules = dict(unet.named_modules())
    targets, bad = [], []
    for name in names:
        module_name, _, leaf = name.rpartition(".")
        module = modules.get(module_name)
        if leaf == "weight" and isinstance(module, nn.Linear):
            targets.append(module_name)
        else:
            bad.append(f"{name} ({type(module).__name__})")
    if bad:
        raise VmcError(f"--lora-rank: {option} selects {len(bad)} tensors that are not linear weights (e.g. "
                       f"{bad[0]}); LoRA adapts nn.Linear weights only: select only to_q/to_k/to_v weights, or "
                       f"tune them fully (--lora-rank 0)")
    if not targets:
        raise VmcError(f"--lora-rank: {option} selects no linear layer in this {type(unet).__name__}")
    return sorted(targets)


def inject_lora(unet: nn.Module, targets: list[str], settings: LoraSettings, seed: int = 0) -> None:
    """Wrap each module of `targets` in a PEFT LoRA layer in place (PEFT freezes everything else), initialised
    from `seed` (`init_lora`). VmcError when `unet` already carries a LoRA."""
    from peft import LoraConfig, inject_adapter_in_model

    if lora_settings(unet) is not None:
        raise VmcError("this model already carries a LoRA; load a fresh model to inject another one")
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, target_modules=list(targets), lora_dropout=0.0,
                        bias="none", init_lora_weights=False)
    with torch.random.fork_rng(devices=[]):  # PEFT draws its own init; ours follows (init_lora)
        inject_adapter_in_model(config, unet, adapter_name=ADAPTER_NAME)
    setattr(unet, _ATTRIBUTE, (settings, tuple(sorted(targets))))
    init_lora(unet, seed)


def lora_settings(unet: nn.Module) -> LoraSettings | None:
    """The settings of the LoRA `inject_lora` put into `unet`, or None."""
    state = getattr(unet, _ATTRIBUTE, None)
    return state[0] if state is not None else None


def lora_modules(unet: nn.Module) -> list[str]:
    """Module names `inject_lora` wrapped in `unet`, sorted (empty without a LoRA)."""
    state = getattr(unet, _ATTRIBUTE, None)
    return list(state[1]) if state is not None else []


def lora_layers(unet: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(module name, PEFT LoRA layer) of every injected layer, in name order."""
    from peft.tuners.lora import LoraLayer

    yield from sorted(((n, m) for n, m in unet.named_modules() if isinstance(m, LoraLayer)), key=lambda x: x[0])


@torch.no_grad()
def init_lora(unet: nn.Module, seed: int) -> None:
    """B = 0 and A Kaiming-uniform (a = sqrt(5), PEFT's and nn.Linear's default) drawn in module-name order from a
    CPU generator seeded with `seed`: the same factors for the same seed, on any device."""
    generator = torch.Generator().manual_seed(seed)
    for _, layer in lora_layers(unet):
        down, up = layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight
        values = torch.empty(down.shape, dtype=torch.float32)
        nn.init.kaiming_uniform_(values, a=math.sqrt(5), generator=generator)
        down.copy_(values)
        up.zero_()


def adapter_key(name: str) -> str:
    """A parameter name as adapter files write it: PEFT's ``….lora_A.default.weight`` -> ``….lora_A.weight``
    (as `peft.get_peft_model_state_dict` saves it); other names unchanged."""
    return _PEFT_PARAM.sub(r".lora_\g<part>.weight", name)


def base_name(name: str) -> str | None:
    """The base model's name of a tensor of an injected model: ``….to_q.base_layer.weight`` -> ``….to_q.weight``;
    None for LoRA factors (not part of the base)."""
    if ".lora_" in name and re.search(r"\.lora_(A|B|embedding_A|embedding_B|magnitude_vector)\.", name):
        return None
    return name.replace(".base_layer.", ".")


def is_lora_adapter(tensors: dict[str, torch.Tensor]) -> bool:
    """Whether an adapter's tensors are LoRA factors (`LORA_KEY` names)."""
    return any(LORA_KEY.fullmatch(name) for name in tensors)


def factor_pairs(tensors: dict[str, torch.Tensor], source: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module name -> (A (r, in), B (out, r)) of a LoRA adapter's tensors; VmcError naming `source` when a name is
    not a LoRA key, a module lacks A or B, or the ranks differ."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        match = LORA_KEY.fullmatch(name)
        if match is None:
            raise VmcError(f"adapter {source}: {name} is not a LoRA factor (<module>.lora_A.weight or "
                           f".lora_B.weight); the file mixes LoRA and full tensors")
        parts.setdefault(match["module"], {})[match["part"]] = value
    pairs = {}
    for module, found in sorted(parts.items()):
        if set(found) != {"A", "B"}:
            raise VmcError(f"adapter {source}: {module} has lora_{''.join(found)} but not both lora_A and lora_B")
        down, up = found["A"], found["B"]
        if down.dim() != 2 or up.dim() != 2 or down.shape[0] != up.shape[1]:
            raise VmcError(f"adapter {source}: {module}'s lora_A {tuple(down.shape)} and lora_B {tuple(up.shape)} "
                           f"are not (r, in) and (out, r)")
        pairs[module] = (down, up)
    ranks = {down.shape[0] for down, _ in pairs.values()}
    if len(ranks) > 1:
        raise VmcError(f"adapter {source}: its LoRA factors have several ranks ({sorted(ranks)})")
    return pairs


def load_lora(unet: nn.Module, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], settings: LoraSettings) -> None:
    """Put the factors `pairs` (`factor_pairs`) into `unet`: injected first when it carries no LoRA, else into the
    LoRA it carries when that has the same modules and settings (VmcError otherwise)."""
    current = lora_settings(unet)
    if current is None:
        inject_lora(unet, list(pairs), settings)
    elif current != settings or lora_modules(unet) != sorted(pairs):
        raise VmcError(f"this model already carries a LoRA (rank {current.rank}, alpha {current.alpha:g}, "
                       f"{len(lora_modules(unet))} layers) other than the adapter's (rank {settings.rank}, alpha "
                       f"{settings.alpha:g}, {len(pairs)} layers); load the adapter into a freshly loaded model")
    layers = dict(lora_layers(unet))
    with torch.no_grad():
        for module, (down, up) in pairs.items():
            layers[module].lora_A[ADAPTER_NAME].weight.copy_(down)
            layers[module].lora_B[ADAPTER_NAME].weight.copy_(up)
