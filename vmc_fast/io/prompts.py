"""Prompts: where each video's prompt comes from, the appearance-invariant helper, and the embedding cache."""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import json
import re
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from vmc_fast.errors import VmcError, VmcWarning
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


_ENGLISH_FUNCTION_WORDS = frozenset(
    "a an the is are was were of in on at to with and his her its their this that".split())


def looks_english(text: str) -> bool:
    """A conservative guess that `text` is English, the only language `appearance_invariant` reads: at least 90%
    of its letters are ASCII and it holds one of a few English function words ("a", "the", "is", "in", ...)."""
    letters = [c for c in text if c.isalpha()]
    if not letters or sum(c.isascii() for c in letters) < 0.9 * len(letters):
        return False
    return any(word in _ENGLISH_FUNCTION_WORDS for word in re.findall(r"[a-z]+", text.lower()))


def derive_prompt(caption: str, video: Path) -> str:
    """`appearance_invariant(caption)` for --derive-prompt; warns (VmcWarning) when the caption does not look
    English, since the rule then cannot find place phrases and the caption is used unchanged."""
    derived = appearance_invariant(caption)
    unchanged = derived == " ".join(caption.strip().rstrip(".").split())
    if unchanged and not looks_english(caption):
        shown = caption if len(caption) <= 40 else caption[:39] + "…"
        warnings.warn(VmcWarning(
            f"--derive-prompt: the caption of {video.name} ({shown!r}) does not look English; place phrases are "
            f"only recognised in English, so it is used unchanged. Write an appearance-invariant prompt in "
            f"{sidecar_name(video)} or translate it"), stacklevel=2)
    return derived


@dataclass(frozen=True)
class ResolvedPrompt:
    """Where one video's prompt came from."""

    text: str | None
    """The normalised prompt (`normalize_prompt`); None when no source has one."""
    source: str | None
    """The caption file or prompt table it was read from, ``--prompt``, or None."""
    empty_source: str | None = None
    """A caption file or table entry that exists but holds no text, e.g. ``caption file clip.txt``."""

    def problem(self, video: Path) -> str:
        """Why `video` has no prompt, and the fix (for a VmcError or a failed manifest entry)."""
        if self.empty_source is not None:
            return (f"video {video}: its {self.empty_source} is empty; write the prompt there (one line, e.g. "
                    f"'a bird is flying') or pass --prompt")
        return (f"video {video}: no prompt; pass --prompt \"a bird is flying\", put it in {sidecar_name(video)} "
                f"beside the video, or add an entry to prompts.yaml")


def resolve_prompts(videos: list[Path], default: str | None) -> dict[Path, str | None]:
    """Each video's prompt text (see `resolve_prompt_sources`); None when it has none."""
    return {video: resolved.text for video, resolved in resolve_prompt_sources(videos, default).items()}


def resolve_prompt_sources(videos: list[Path], default: str | None) -> dict[Path, ResolvedPrompt]:
    """Each video's prompt: its caption file NAME.txt, then its entry in prompts.yaml/yml/json beside it, then
    `default` (--prompt; may be None).

    File names and table keys match case-insensitively when there is no exact match (CLIP.MP4 finds clip.txt).
    Every text is read as `read_text_file` does and normalised by `normalize_prompt`. An empty caption file or
    entry falls through to the next source with a VmcWarning, or is reported by `ResolvedPrompt.problem`.
    Raises VmcError when several files or entries match one video, or a file cannot be read.
    """
    folders: dict[Path, _Folder] = {}
    default = normalize_prompt(default) if default is not None else None
    resolved = {}
    for video in videos:
        folder = folders.setdefault(video.parent, _Folder(video.parent))
        resolved[video] = _resolve_one(video, folder, default)
    return resolved


def sidecar_name(video: Path) -> str:
    """The caption file's name: ``clip.txt`` for ``clip.mp4``, ``frames.txt`` for a frame folder ``frames/``."""
    return f"{video.name if video.is_dir() else video.stem}.txt"


def _resolve_one(video: Path, folder: "_Folder", default: str | None) -> ResolvedPrompt:
    candidates = []  # (text, source), in order of precedence
    empty = []
    sidecar = folder.match(sidecar_name(video), f"video {video}: several caption files match")
    if sidecar is not None:
        candidates.append((normalize_prompt(read_text_file(sidecar, "caption file")), str(sidecar)))
        if not candidates[-1][0]:
            empty.append(f"caption file {sidecar.name}")
    table = folder.table()
    if table is not None:
        key = table.key_for(video)
        if key is not None:
            candidates.append((table.entries[key], f"{table.path} (entry {key!r})"))
            if not table.entries[key]:
                empty.append(f"entry {key!r} in {table.path.name}")
    if default:
        candidates.append((default, "--prompt"))
    text, source = next(((t, s) for t, s in candidates if t), (None, None))
    if empty and text is not None:
        shown = text if len(text) <= 40 else text[:39] + "…"
        warnings.warn(VmcWarning(f"video {video}: its {empty[0]} is empty; using {source} {shown!r}"), stacklevel=2)
    return ResolvedPrompt(text, source, empty[0] if empty and text is None else None)


class _Folder:
    """One folder's file names, indexed once by their case-folded form, and its prompt table."""

    TABLE_NAMES = ("prompts.yaml", "prompts.yml", "prompts.json")

    def __init__(self, path: Path):
        self.path = path
        self.files: dict[str, list[Path]] = {}
        if path.is_dir():
            for entry in sorted(path.iterdir()):
                if entry.is_file():
                    self.files.setdefault(entry.name.casefold(), []).append(entry)
        self._table: _PromptTable | None | bool = False  # False: not read yet

    def match(self, name: str, ambiguity: str) -> Path | None:
        """The file called `name`: the exact name, else the one file whose name differs only in case."""
        candidates = self.files.get(name.casefold(), [])
        exact = [p for p in candidates if p.name == name]
        if exact or len(candidates) <= 1:
            return (exact or candidates or [None])[0]
        raise VmcError(f"{ambiguity} ({', '.join(p.name for p in candidates)}) in {self.path}; keep one")

    def table(self) -> "_PromptTable | None":
        if self._table is False:
            found = [p for name in self.TABLE_NAMES for p in self.files.get(name, [])]
            if len(found) > 1:
                raise VmcError(f"folder {self.path}: several prompt tables ({', '.join(p.name for p in found)}); "
                               f"keep one")
            self._table = _PromptTable(found[0]) if found else None
        return self._table


class _PromptTable:
    """prompts.yaml/json: video name (with or without its suffix) -> prompt."""

    def __init__(self, path: Path):
        self.path = path
        self.entries = {key: normalize_prompt(value) for key, value in _read_table(path).items()}

    def key_for(self, video: Path) -> str | None:
        """The entry of `video`: an exact key (stem, then name), else the one key equal to either up to case."""
        names = [video.name] if video.is_dir() else [video.stem, video.name]
        exact = [n for n in names if n in self.entries]
        if exact:
            return exact[0]
        wanted = {n.casefold() for n in names}
        keys = [k for k in self.entries if k.casefold() in wanted]
        if len(keys) > 1:
            raise VmcError(f"prompt file {self.path}: several entries match video {video.name} "
                           f"({', '.join(map(repr, keys))}); keep one")
        return keys[0] if keys else None


def _read_table(path: Path) -> dict[str, str]:
    import yaml

    text = read_text_file(path, "prompt file")
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise VmcError(f"prompt file {path}: cannot be parsed ({exc}); it must map video names to prompts") from exc
    if data is None:  # an empty file
        return {}
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise VmcError(f"prompt file {path}: must be a mapping of video name -> prompt text, e.g. "
                       f"'bird.mp4: a bird is flying'")
    return {str(k): v for k, v in data.items()}


# --------------------------------------------------------------------------------------------- text


_UTF32_UTF16_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
                     (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))  # 32 first: it starts like 16
_INVISIBLE = str.maketrans("", "", "\ufeff\u200b\u2060")  # byte-order marks, zero-width space, word joiner


def read_text_file(path: Path, what: str) -> str:
    """The text of a caption or prompt file as editors write it: UTF-8 with or without a byte-order mark, or
    UTF-16/UTF-32 with one (Windows "Unicode"); CRLF and CR line ends become LF; NFC-normalised.

    Raises VmcError naming the file (`what` says which kind) when it is not UTF-8 text, e.g. Latin-1 or UTF-16
    without a byte-order mark.
    """
    raw = path.read_bytes()
    encoding = next((enc for bom, enc in _UTF32_UTF16_BOMS if raw.startswith(bom)), "utf-8-sig")
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as exc:
        raise VmcError(f"{what} {path}: not {encoding.upper().removesuffix('-SIG')} text (byte 0x{raw[exc.start]:02x} "
                       f"at position {exc.start}); save it as UTF-8") from exc
    if "\x00" in text:  # UTF-16 without a byte-order mark decodes as UTF-8 with a NUL after every ASCII letter
        raise VmcError(f"{what} {path}: holds NUL bytes (UTF-16 without a byte-order mark?); save it as UTF-8")
    return unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")


def normalize_prompt(text: str) -> str:
    """The one form of a prompt, whatever its source (caption file, prompt table, --prompt): NFC, without
    byte-order marks and zero-width characters, whitespace runs (line ends included) as one space, trimmed.
    Equal prompts therefore share one embedding-cache entry."""
    return " ".join(unicodedata.normalize("NFC", text).translate(_INVISIBLE).split())


# --------------------------------------------------------------------------------------------- embeddings


@dataclass(frozen=True)
class TokenReport:
    """How much of a prompt its text encoder reads (encoders stop at a fixed number of tokens)."""

    num_tokens: int
    """Tokens of the whole prompt, the encoder's special tokens included."""
    max_tokens: int
    """Tokens the encoder reads (77 for CLIP and Show-1's T5), special tokens included."""
    encoded: str
    """The start of the prompt that was encoded (the whole prompt when it fits)."""
    dropped: str
    """The rest, which the encoder never saw; empty when the prompt fits."""

    @property
    def truncated(self) -> bool:
        return self.num_tokens > self.max_tokens


def token_report(tokenizer, prompt: str, max_tokens: int) -> TokenReport:
    """What a `max_tokens`-token encoder reads of `prompt`, for a transformers tokenizer (fast or slow).

    Fast tokenizers give the exact characters through their offsets; slow ones (CLIPTokenizer) through the
    longest start of the prompt whose tokens begin the truncated sequence.
    """
    special = set(tokenizer.all_special_ids)
    num_tokens = len(tokenizer(prompt, truncation=False, verbose=False)["input_ids"])
    if num_tokens <= max_tokens:
        return TokenReport(num_tokens, max_tokens, prompt, "")
    if tokenizer.is_fast:
        batch = tokenizer(prompt, truncation=True, max_length=max_tokens, return_offsets_mapping=True)
        end = max((e for (_, e), i in zip(batch["offset_mapping"], batch["input_ids"]) if i not in special),
                  default=0)
    else:
        kept = [i for i in tokenizer(prompt, truncation=True, max_length=max_tokens)["input_ids"] if i not in special]
        end = _longest_encoded_start(tokenizer, prompt, kept)
    return TokenReport(num_tokens, max_tokens, prompt[:end].rstrip(), prompt[end:].strip())


def _longest_encoded_start(tokenizer, prompt: str, kept: list[int]) -> int:
    """The largest `end` such that the tokens of prompt[:end] begin `kept` (the truncated sequence)."""
    def ids(end: int) -> list[int]:
        return tokenizer(prompt[:end], add_special_tokens=False, verbose=False)["input_ids"]

    lo, hi = 0, len(prompt)  # token counts grow with the prefix: bisect for the longest one that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if len(ids(mid)) <= len(kept) else (lo, mid - 1)
    end = lo
    while end > 0 and ids(end) != kept[: len(ids(end))]:  # cut inside a word that was split differently
        end -= 1
    return end


@dataclass(frozen=True)
class EncodedPrompt:
    """One prompt's text states and what its encoder read of it."""

    states: torch.Tensor
    """(L, D) float32 text states."""
    tokens: TokenReport | None
    """None when the encoder cannot say (it has no `encoded_text`, e.g. benchmark stand-ins)."""

    @property
    def encoded_text(self) -> str | None:
        return self.tokens.encoded if self.tokens is not None else None


PromptEncoderFactory = Callable[[], Callable[[list[str]], torch.Tensor]]
"""Builds a prompt encoder: list of B prompts -> (B, L, D) states (optionally with `encoded_text`)."""


def cached_prompt_embeddings(prompts: list[str], model_key: str, cache_dir: str | Path,
                             load_encoder: PromptEncoderFactory) -> dict[str, torch.Tensor]:
    """prompt -> (L, D) float32 states (`encode_prompts` without the token reports)."""
    return {p: e.states for p, e in encode_prompts(prompts, model_key, cache_dir, load_encoder).items()}


def encode_prompts(prompts: list[str], model_key: str, cache_dir: str | Path,
                   load_encoder: PromptEncoderFactory) -> dict[str, EncodedPrompt]:
    """prompt -> its states (L, D) float32 and token report, from the disk cache or computed in one encoder
    session; warns (VmcWarning) for every prompt longer than the encoder reads, on cache hits too.

    The encoder is only built when some prompt is missing and is dropped before returning, so it never stays
    resident during training. Its optional `encoded_text(prompt) -> TokenReport` is stored in the cache
    metadata, so a cache hit knows what was encoded without the encoder.
    """
    folder = Path(cache_dir) / "prompt-embeddings"
    paths = {p: folder / f"{_cache_key(model_key, p)}.safetensors" for p in prompts}
    loaded = {p: _read_cached(paths[p]) for p in dict.fromkeys(prompts)}
    missing = [p for p, entry in loaded.items() if entry is None]
    if missing:
        encoder = load_encoder()
        states = encoder(missing)
        reports = [encoder.encoded_text(p) if hasattr(encoder, "encoded_text") else None for p in missing]
        del encoder
        folder.mkdir(parents=True, exist_ok=True)
        for prompt, state, report in zip(missing, states, reports):
            tokens = json.dumps(dataclasses.asdict(report)) if report is not None else ""
            atomic_save_file({"states": state.contiguous()}, paths[prompt],
                             {"prompt": prompt, "model": model_key, "tokens": tokens})
            loaded[prompt] = EncodedPrompt(state.detach().to("cpu", torch.float32).contiguous(), report)
    for prompt, entry in loaded.items():
        if entry.tokens is not None and entry.tokens.truncated:
            warnings.warn(VmcWarning(_truncation_message(prompt, entry.tokens, model_key)), stacklevel=2)
    return {p: loaded[p] for p in prompts}


def _read_cached(path: Path) -> EncodedPrompt | None:
    """A cache entry, or None when there is none or it predates token reports (it is then recomputed)."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
        if "tokens" not in meta:
            return None
        states = handle.get_tensor("states")
    return EncodedPrompt(states, TokenReport(**json.loads(meta["tokens"])) if meta["tokens"] else None)


def _truncation_message(prompt: str, tokens: TokenReport, model_key: str) -> str:
    model = model_key.split(":", 1)[-1]
    shown = prompt if len(prompt) <= 40 else prompt[:39] + "…"
    dropped = tokens.dropped if len(tokens.dropped) <= 120 else f"{tokens.dropped[:60]} … {tokens.dropped[-57:]}"
    return (f"prompt {shown!r} is {tokens.num_tokens} tokens; {model}'s text encoder reads {tokens.max_tokens}, so "
            f"the end is dropped: {dropped!r}. Shorten the prompt; the adapter and the video's sidecar record the "
            f"text that was encoded")


def embedding_model_key(model_id: str, family: str) -> str:
    """Cache key of a model's prompt encoder; a local folder is keyed by its absolute path so that two folders
    with the same name do not collide. Training and generation share it, and so share the cache."""
    folder = Path(model_id).expanduser()
    return f"{family}:{folder.resolve() if folder.is_dir() else model_id}"


def _cache_key(model_key: str, prompt: str) -> str:
    return hashlib.sha256(f"{model_key}\0{prompt}".encode()).hexdigest()[:32]
