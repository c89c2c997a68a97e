"""Prompts: where each video's prompt comes from, the appearance-invariant helper, and the embedding cache."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Callable

import torch

from vmc_fast.errors import VmcError
from vmc_fast.io.files import atomic_save_file

# Phrases of place or scenery start with one of these prepositions and a determiner or adjective-noun; motion
# phrases ("in a circle", "to the left") are kept because their nouns describe the path, not the scene.
_PLACE_PREPOSITIONS = (
    "above", "across", "against", "along", "among", "amid", "at", "behind", "below", "beneath", "beside",
    "between", "by", "in", "inside", "near", "next to", "on", "onto", "over", "through", "under", "underneath",
    "within", "with",
)
_MOTION_NOUNS = (
    "circle", "circles", "zigzag", "spiral", "loop", "loops", "line", "straight line", "figure-eight",
    "figure eight", "arc", "wave", "waves", "slow motion", "place", "reverse", "direction",
)
_DETERMINERS = r"(?:the|a|an|some|his|her|its|their|this|that|front of|middle of)"
_PLACE_PHRASE = re.compile(
    rf"\s*,?\s+\b(?:{'|'.join(re.escape(p) for p in _PLACE_PREPOSITIONS)})\s+(?:{_DETERMINERS}\s+)?"
    rf"(?P<noun>[\w\- ]+?)(?=\s*(?:,|\.|$|\b(?:{'|'.join(_PLACE_PREPOSITIONS)})\b))",
    re.IGNORECASE,
)


def appearance_invariant(caption: str) -> str:
    """Drop background and place phrases, keep subject and motion.

    "A bird is flying above a lake in the forest" -> "A bird is flying";
    "a cat is roaring on the grass under the tree" -> "a cat is roaring".
    """
    text = caption.strip().rstrip(".")
    while True:
        match = next((m for m in _PLACE_PHRASE.finditer(text) if not _is_motion(m.group("noun"))), None)
        if match is None:
            break
        # Everything after a place phrase describes the scene too ("... on the grass under the tree").
        text = text[: match.start()]
    return re.sub(r"\s+", " ", text).strip(" ,") or caption.strip()


def _is_motion(noun: str) -> bool:
    noun = noun.lower().strip()
    return any(noun == m or noun.endswith(" " + m) for m in _MOTION_NOUNS)


def resolve_prompts(videos: list[Path], default: str | None) -> dict[Path, str | None]:
    """Each video's prompt: sidecar NAME.txt, then prompts.yaml/json beside it, then `default` (may be None)."""
    tables: dict[Path, dict[str, str]] = {}
    prompts = {}
    for video in videos:
        folder = video.parent
        if folder not in tables:
            tables[folder] = _prompt_table(folder)
        prompts[video] = _sidecar(video) or tables[folder].get(video.stem) or tables[folder].get(video.name) \
            or default
    return prompts


def _sidecar(video: Path) -> str | None:
    sidecar = video.with_suffix(".txt") if video.is_file() else video.parent / f"{video.name}.txt"
    if sidecar.is_file():
        text = sidecar.read_text(encoding="utf-8").strip()
        return text or None
    return None


def _prompt_table(folder: Path) -> dict[str, str]:
    for name in ("prompts.yaml", "prompts.yml", "prompts.json"):
        path = folder / name
        if path.is_file():
            return _read_table(path)
    return {}


def _read_table(path: Path) -> dict[str, str]:
    import yaml

    try:
        data = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise VmcError(f"prompt file {path}: cannot be parsed ({exc}); it must map video names to prompts") from exc
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise VmcError(f"prompt file {path}: must be a mapping of video name -> prompt text, e.g. "
                       f"'bird.mp4: a bird is flying'")
    return {str(k): v.strip() for k, v in data.items()}


# --------------------------------------------------------------------------------------------- embeddings


def cached_prompt_embeddings(prompts: list[str], model_key: str, cache_dir: str | Path,
                             load_encoder: Callable[[], Callable[[list[str]], torch.Tensor]]) -> dict[str, torch.Tensor]:
    """prompt -> (L, D) float32 states, from the disk cache or computed in one encoder session.

    The encoder is only built when some prompt is missing and is dropped before returning, so it never stays
    resident during training.
    """
    from safetensors.torch import load_file

    folder = Path(cache_dir) / "prompt-embeddings"
    paths = {p: folder / f"{_cache_key(model_key, p)}.safetensors" for p in prompts}
    missing = [p for p in dict.fromkeys(prompts) if not paths[p].is_file()]
    if missing:
        encoder = load_encoder()
        states = encoder(missing)
        del encoder
        folder.mkdir(parents=True, exist_ok=True)
        for prompt, state in zip(missing, states):
            atomic_save_file({"states": state.contiguous()}, paths[prompt], {"prompt": prompt, "model": model_key})
    return {p: load_file(paths[p])["states"] for p in prompts}


def embedding_model_key(model_id: str, family: str) -> str:
    """Cache key of a model's prompt encoder; a local folder is keyed by its absolute path so that two folders
    with the same name do not collide. Training and generation share it, and so share the cache."""
    folder = Path(model_id).expanduser()
    return f"{family}:{folder.resolve() if folder.is_dir() else model_id}"


def _cache_key(model_key: str, prompt: str) -> str:
    return hashlib.sha256(f"{model_key}\0{prompt}".encode()).hexdigest()[:32]
