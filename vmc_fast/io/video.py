"""Video in and out: find the videos, decode them (PyAV or frame folders) as a player shows them, sample frames,
crop and resize, scale to [-1, 1]; write frames as gif or mp4.

Reading a clip, in order:
1. frames are decoded one by one and only the sampled ones are converted and kept, so memory depends on the
   frames taken, not on where they start; sampling is by index, or by time with `FrameSampling.fps`;
2. each kept frame is turned upright (the stream's display matrix; a JPEG's EXIF orientation), transparent
   pixels are composited onto the background, and non-square pixels are made square;
3. the clip is centre-cropped (``crop``) and resized.
`read_clip` returns what was taken as a `ClipInfo` (its `summary()` is the line the CLI prints).

Every failure to read raises VmcError naming the file and the fix; what a user should know about an input
(transparency, irregular timestamps, a crop that cuts much, ambiguous frame names) is a VmcWarning.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from vmc_fast.errors import VmcError, VmcWarning
from vmc_fast.io.files import atomic_path

VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".gif", ".mkv", ".avi", ".m4v")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
TIME_EPS = 1e-6
"""Seconds: a frame stamped within this of a tick counts as shown at the tick (timestamps are rounded)."""
CROP_WARN_AT = 0.75
BACKGROUND_COLOURS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128), "grey": (128, 128, 128)}
"""A crop keeping this share of a side or less (cutting a quarter or more) is worth a warning."""

Ops = tuple[bool, bool, bool]
"""How a stored frame is turned upright: (transpose, flip left-right, flip top-bottom), applied in that order."""
TRANSFORMS: dict[Ops, tuple[str, str]] = {
    (False, False, False): ("none", "as stored"),
    (False, True, False): ("hflip", "mirrored left-right"),
    (False, False, True): ("vflip", "mirrored top-bottom"),
    (False, True, True): ("rot180", "turned 180°"),
    (True, False, False): ("transpose", "turned 90° clockwise and mirrored left-right"),
    (True, True, False): ("rot90cw", "turned 90° clockwise"),
    (True, False, True): ("rot90ccw", "turned 90° counter-clockwise"),
    (True, True, True): ("transverse", "turned 90° counter-clockwise and mirrored left-right"),
}
"""{ops: (name, words)}: the eight right-angle orientations."""
EXIF_ORIENTATION: dict[int, Ops] = {
    1: (False, False, False), 2: (False, True, False), 3: (False, True, True), 4: (False, False, True),
    5: (True, False, False), 6: (True, True, False), 7: (True, True, True), 8: (True, False, True),
}
"""EXIF tag 0x0112 -> ops (the EXIF 2.3 table; what `PIL.ImageOps.exif_transpose` does)."""


@dataclass(frozen=True)
class FrameSampling:
    """Which source frames to take and at what size."""

    num_frames: int
    """Frames to keep."""
    height: int | None
    """Output height in pixels; None keeps the displayed one (or follows `width` at the displayed aspect)."""
    width: int | None
    """Output width in pixels; None keeps the displayed one (or follows `height` at the displayed aspect)."""
    stride: int = 1
    """Take every k-th source frame (every k-th tick with `fps`)."""
    start: int = 0
    """First source frame (first tick with `fps`)."""
    resize: str = "crop"
    """``crop`` keeps the aspect (center crop), ``squash`` stretches."""
    reverse: bool = False
    """Reverse the sampled frames."""
    fps: float | None = None
    """Sample by time: tick k is at t0 + k / fps (t0: the first frame's time) and takes the frame shown then;
    `start` and `stride` count ticks. None: take frames by index."""
    background: str = "white"
    """Colour transparent pixels are composited onto (`background_rgb`)."""

    @property
    def num_source_frames(self) -> int:
        """Source frames (ticks with `fps`) from the first to the last one taken."""
        return self.start + self.stride * (self.num_frames - 1) + 1

    @property
    def positions(self) -> list[int]:
        """Source frame indices (ticks with `fps`) to take, in playing order before `reverse`."""
        return [self.start + self.stride * k for k in range(self.num_frames)]


@dataclass(frozen=True)
class ClipInfo:
    """What `read_clip` took from a video and how. Sizes are (height, width) in pixels."""

    path: str
    """The video file or frame folder."""
    num_available: int | None
    """Frames in the source; None when the container does not say and the clip was not decoded to its end."""
    stored_size: tuple[int, int]
    """Frame size as stored in the file."""
    displayed_size: tuple[int, int]
    """Frame size as a player shows it: turned upright, pixels square."""
    transform: str
    """How stored frames were turned upright (a `TRANSFORMS` name: none, rot90cw, hflip, ...)."""
    transform_source: str
    """Where the orientation came from: "display matrix", "EXIF orientation" or "" (none)."""
    frame_indices: tuple[int, ...]
    """Source frames taken, in output order (reversed with `reverse`; a held frame repeats when sampling by
    time)."""
    frame_times: tuple[float, ...] | None
    """Their presentation times in seconds, in output order; None for frame folders or without timestamps."""
    timing: str
    """``index`` (every `stride`-th frame) or ``fps=<rate>`` (sampled by time)."""
    irregular_timing: bool
    """The decoded frames' durations vary (variable frame rate, merged GIF frames)."""
    source_fps: float | None
    """Frames per second of the decoded range (1 / median frame duration); None without timestamps."""
    start: int
    """First frame (tick) taken."""
    stride: int
    """Step between frames (ticks) taken."""
    reverse: bool
    """The frames were reversed."""
    crop_box: tuple[int, int, int, int]
    """(top, left, height, width) of the crop, in displayed pixels (the whole frame with ``squash``)."""
    output_size: tuple[int, int]
    """Size of the returned frames."""
    alpha: str
    """``none``, or how transparency was handled: "composited on #ffffff, 50% transparent"."""
    notes: tuple[str, ...] = ()
    """The warnings raised while reading, as their messages."""

    def summary(self) -> str:
        """One line: which frames, how they were turned, the crop box and the output size."""
        parts = [f"{Path(self.path).name}: {self._frames_text()}"]
        stored, shown = _wxh(self.stored_size), _wxh(self.displayed_size)
        if self.transform != "none":
            parts.append(f"{self.transform_source} applied: {TRANSFORMS_BY_NAME[self.transform]} "
                         f"(stored {stored}, shown {shown})")
        elif self.stored_size != self.displayed_size:
            parts.append(f"non-square pixels made square (stored {stored}, shown {shown})")
        if self.alpha != "none":
            parts.append(f"transparency {self.alpha}")
        top, left, height, width = self.crop_box
        if (height, width) == self.displayed_size:
            parts.append(f"no crop of {shown}")
        else:
            parts.append(f"crop {width}x{height} at x={left} y={top} of {shown}")
        resized = "resized to" if self.output_size != (height, width) else "kept at"
        return ", ".join(parts) + f", {resized} {_wxh(self.output_size)} (sizes: width x height)"

    def _frames_text(self) -> str:
        of = f" of {self.num_available}" if self.num_available else ""
        order = "; reversed" if self.reverse else ""
        unit = "tick" if self.timing != "index" else "frame"
        first = self.start
        last = self.start + self.stride * (len(self.frame_indices) - 1)
        span = self._span_text()
        if self.timing == "index":
            return f"frames {first}-{last}{of} (stride {self.stride} from {first}{order}{span})"
        return (f"frames {_index_list(self.frame_indices)}{of} sampled at {self.timing[4:]} fps ({unit}s "
                f"{first}-{last}, stride {self.stride}{order}{span})")

    def _span_text(self) -> str:
        rate = self.source_fps if self.timing == "index" else float(self.timing[4:])
        if not self.frame_times or not rate:
            return ""
        seconds = len(self.frame_indices) * self.stride / rate
        return f"; {seconds:.2f} s from {min(self.frame_times):.2f} s at {rate:.3g} fps"

    def record(self) -> dict:
        """JSON-ready: every field (tuples as lists) and the summary line."""
        return {**_json_ready(dataclasses.asdict(self)), "summary": self.summary()}

    @classmethod
    def from_record(cls, record: dict) -> "ClipInfo":
        """Inverse of `record` (the summary is recomputed)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in record.items() if k in names})

    def manifest_fields(self) -> dict:
        """What a run's manifest records per video: the frames taken, the crop box, the displayed size, all."""
        return {"frames": list(self.frame_indices), "crop_box": list(self.crop_box),
                "displayed_size": list(self.displayed_size), "clip": self.record()}


TRANSFORMS_BY_NAME = {name: words for name, words in TRANSFORMS.values()}


def _json_ready(value):
    """Tuples as lists, recursively (what json.dumps would write)."""
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    return value


def _wxh(size: tuple[int, int]) -> str:
    return f"{size[1]}x{size[0]}"


def _index_list(indices: tuple[int, ...]) -> str:
    shown = [str(i) for i in indices]
    return ", ".join(shown if len(shown) <= 12 else [*shown[:6], "...", *shown[-3:]])


# --------------------------------------------------------------------------------------------- finding


def background_rgb(value: str, option_name: str = "--background") -> tuple[int, int, int]:
    """(r, g, b) 0-255 of a background colour: white | black | gray | #RRGGBB (ValueError naming the option)."""
    text = value.strip().lower()
    if text in BACKGROUND_COLOURS:
        return BACKGROUND_COLOURS[text]
    if re.fullmatch(r"#[0-9a-f]{6}", text) is None:
        raise ValueError(f"{option_name}: {value!r} is not a colour; use white, black, gray or #RRGGBB (e.g. #00ff00)")
    return tuple(int(text[i: i + 2], 16) for i in (1, 3, 5))


def natural_key(name: str) -> tuple:
    """Sort key that orders numbers inside a name by value: frame_2 before frame_10, img9 before img10.

    Text parts compare case-insensitively; the parts alternate text, number, text, ... so each part always
    compares with one of its own type.
    """
    parts = re.split(r"(\d+)", name)
    return tuple(int(part) if i % 2 else part.casefold() for i, part in enumerate(parts))


def _by_name(path: Path) -> tuple:
    return natural_key(path.stem if path.is_file() else path.name), path.suffix.casefold(), path.name


def _visible(path: Path) -> bool:
    # Dot-files: macOS AppleDouble "._frame_1.png" files carry an image suffix but are not images.
    return not path.name.startswith(".")


def find_videos(path: str | Path) -> list[Path]:
    """The videos under `path`: a video file, a folder of frame images, or a folder holding those.

    A folder whose own files are images is one video; otherwise each video file and each sub-folder of images
    in it is a video, in natural name order (numbers by value). Dot-files and dot-folders are skipped.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise VmcError(f"--videos {path}: no such file or folder")
    if path.is_file():
        if path.suffix.lower() not in VIDEO_SUFFIXES:
            raise VmcError(f"--videos {path}: not a video file; use one of {', '.join(VIDEO_SUFFIXES)} "
                           f"or a folder of frame images")
        return [path]
    if _image_files(path):
        return [path]
    videos = sorted((p for p in path.iterdir() if _visible(p) and (
        (p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES) or (p.is_dir() and _image_files(p)))), key=_by_name)
    if not videos:
        raise VmcError(f"--videos {path}: the folder holds no videos ({', '.join(VIDEO_SUFFIXES)}) and no frame "
                       f"images ({', '.join(IMAGE_SUFFIXES)}); add some or point --videos elsewhere")
    return videos


def _image_files(folder: Path) -> list[Path]:
    """The frame images of a folder in natural order (frame_2 before frame_10), dot-files skipped."""
    files = [p for p in folder.iterdir() if p.is_file() and _visible(p) and p.suffix.lower() in IMAGE_SUFFIXES]
    return sorted(files, key=_by_name)


def _clashing_numbers(folder: Path, files: list[Path]) -> list[str]:
    """Notes for files whose names differ only in zero padding or suffix (frame_1.png, frame_01.png, frame_1.jpg):
    both are read, as two frames, which is rarely what was meant."""
    groups: dict[tuple, list[str]] = {}
    for file in files:
        groups.setdefault(natural_key(file.stem), []).append(file.name)
    notes = []
    for key, names in groups.items():
        if len(names) > 1:
            numbers = ", ".join(str(part) for part in key[1::2])
            notes.append(f"frame folder {folder}: {' and '.join(names)} share the number {numbers} and are read as "
                         f"{len(names)} frames; remove all but one")
    return notes


# --------------------------------------------------------------------------------------------- reading


def load_video(path: str | Path, num_frames: int = 8, height: int | None = None, width: int | None = None,
               frame_stride: int = 1, start_frame: int = 0, reverse: bool = False, resize: str = "crop", *,
               fps: float | None = None, background: str = "white") -> torch.Tensor:
    """One video file or frame folder as a clip: float32 (C=3, F, H, W) in [-1, 1], frames as a player shows
    them (display rotation, EXIF orientation and pixel aspect applied; transparency composited on `background`).

    Takes `num_frames` frames, every `frame_stride`-th from `start_frame`; `reverse` plays them backwards.
    With `fps` the clip is first resampled on its timeline at that rate (the frame shown at each tick) and
    start/stride count ticks. height/width None keep the displayed size (one of them alone keeps the displayed
    aspect); otherwise ``crop`` centre-crops to the target aspect before resizing, ``squash`` stretches.
    Raises VmcError for an unreadable or too short video, ValueError naming a bad argument.
    """
    for name, value, low in (("num_frames", num_frames, 1), ("frame_stride", frame_stride, 1),
                             ("start_frame", start_frame, 0), ("height", height, 1), ("width", width, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low):
            raise ValueError(f"load_video: {name} must be an integer of at least {low}"
                             f"{' or None' if name in ('height', 'width') else ''}, got {value!r}")
    if resize not in ("crop", "squash"):
        raise ValueError(f"load_video: resize must be 'crop' or 'squash', got {resize!r}")
    if fps is not None and not (isinstance(fps, numbers.Real) and 0 < fps < math.inf):
        raise ValueError(f"load_video: fps must be a positive number or None, got {fps!r}")
    background_rgb(background, "load_video: background")
    sampling = FrameSampling(num_frames=num_frames, height=height, width=width, stride=frame_stride,
                             start=start_frame, resize=resize, reverse=reverse, fps=fps, background=background)
    return read_clip(path, sampling)[0]


def load_clip(path: str | Path, sampling: FrameSampling) -> torch.Tensor:
    """Decode, sample and resize one video: float32 (3, F, H, W) in [-1, 1] (see `read_clip`)."""
    return read_clip(path, sampling)[0]


def read_clip(path: str | Path, sampling: FrameSampling) -> tuple[torch.Tensor, ClipInfo]:
    """Decode, sample, turn upright, composite, crop and resize one video or frame folder.

    Returns float32 (3, F, H, W) in [-1, 1] and what was taken. H and W are the sampling's, a missing one
    following the displayed aspect. Warns (VmcWarning) about transparency, irregular timestamps, a crop that
    keeps 3/4 of a side or less and clashing frame names. Raises VmcError naming the file for an unreadable or
    too short video.
    """
    path = Path(path)
    source = _read_frame_folder(path, sampling) if path.is_dir() else _decode_video(path, sampling)
    clip = torch.from_numpy(np.stack(source.frames)).permute(3, 0, 1, 2)  # (3, F, h, w) float32 0..255 upright
    if tuple(clip.shape[-2:]) != source.displayed_size:  # non-square pixels
        clip = _interpolate(clip, source.displayed_size)
    target = _target_size(source.displayed_size, sampling)
    box = crop_box(source.displayed_size, target[0] / target[1]) if sampling.resize == "crop" \
        else (0, 0, *source.displayed_size)
    top, left, crop_h, crop_w = box
    clip = clip[..., top: top + crop_h, left: left + crop_w]
    if (crop_h, crop_w) != target:
        clip = _interpolate(clip, target)
    indices, times = source.indices, source.times
    if sampling.reverse:
        clip, indices, times = clip.flip(1), indices[::-1], times[::-1] if times else times
    notes = [*source.notes, *_crop_notes(path, source.displayed_size, box)]
    info = ClipInfo(
        path=str(path), num_available=source.num_available, stored_size=source.stored_size,
        displayed_size=source.displayed_size, transform=TRANSFORMS[source.ops][0],
        transform_source=source.ops_source if source.ops != (False, False, False) else "",
        frame_indices=tuple(indices), frame_times=tuple(times) if times else None,
        timing="index" if sampling.fps is None or path.is_dir() else f"fps={sampling.fps:g}",  # folders: no times
        irregular_timing=source.irregular,
        source_fps=source.source_fps, start=sampling.start, stride=sampling.stride, reverse=sampling.reverse,
        crop_box=box, output_size=target, alpha=source.alpha, notes=tuple(dict.fromkeys(notes)),
    )
    for note in info.notes:
        warnings.warn(VmcWarning(note), stacklevel=2)
    return (clip / 127.5 - 1.0).clamp(-1, 1).contiguous(), info


def _target_size(source: tuple[int, int], sampling: FrameSampling) -> tuple[int, int]:
    """(height, width) of the output: the sampling's, with a missing one following the source's aspect."""
    h, w = source
    if sampling.height is None and sampling.width is None:
        return h, w
    if sampling.height is None:
        return max(1, round(sampling.width * h / w)), sampling.width
    if sampling.width is None:
        return sampling.height, max(1, round(sampling.height * w / h))
    return sampling.height, sampling.width


def crop_box(size: tuple[int, int], aspect: float) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the largest centred box of `size` (h, w) with height / width == aspect (to
    the nearest pixel)."""
    h, w = size
    crop_h, crop_w = (h, round(h / aspect)) if h / w < aspect else (round(w * aspect), w)
    crop_h, crop_w = max(1, min(crop_h, h)), max(1, min(crop_w, w))
    return (h - crop_h) // 2, (w - crop_w) // 2, crop_h, crop_w


def resize_clip(clip: torch.Tensor, height: int, width: int, mode: str) -> torch.Tensor:
    """(3, F, h, w) -> (3, F, height, width); ``crop`` center-crops to the target aspect first."""
    if mode == "crop":
        clip = center_crop_to_aspect(clip, height / width)
    return clip if clip.shape[-2:] == (height, width) else _interpolate(clip, (height, width))


def center_crop_to_aspect(clip: torch.Tensor, aspect: float) -> torch.Tensor:
    """Largest centered crop of (..., h, w) with h / w == aspect (to the nearest pixel)."""
    top, left, crop_h, crop_w = crop_box(tuple(clip.shape[-2:]), aspect)
    return clip[..., top: top + crop_h, left: left + crop_w]


def _interpolate(clip: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(3, F, h, w) float -> (3, F, *size), bilinear with antialiasing (frames as the batch)."""
    frames = F.interpolate(clip.permute(1, 0, 2, 3), size=tuple(size), mode="bilinear", antialias=True,
                           align_corners=False)
    return frames.permute(1, 0, 2, 3)


def _crop_notes(path: Path, size: tuple[int, int], box: tuple[int, int, int, int]) -> list[str]:
    (h, w), (_, _, crop_h, crop_w) = size, box
    if crop_w <= CROP_WARN_AT * w:
        kept = f"keeps {crop_w} of {w} columns (the sides are cut)"
    elif crop_h <= CROP_WARN_AT * h:
        kept = f"keeps {crop_h} of {h} rows (the top and bottom are cut)"
    else:
        return []
    return [f"{path.name}: --resize crop {kept}; pass --resize squash, or --height/--width with the clip's "
            f"{_aspect_text(h, w)} aspect"]


def _aspect_text(h: int, w: int) -> str:
    g = math.gcd(h, w)
    return f"{w // g}:{h // g}" if max(w, h) // g <= 32 else f"{w}x{h} ({w / h:.2f}:1)"


# --------------------------------------------------------------------------------------------- one frame


@dataclass
class _Source:
    """The frames kept from one source, upright and composited, with what was seen on the way."""

    frames: list[np.ndarray]
    """(h, w, 3) float32 0..255, in sampled order."""
    indices: list[int]
    """Their source frame indices."""
    times: list[float] | None
    """Their times in seconds (None without timestamps)."""
    num_available: int | None
    stored_size: tuple[int, int]
    displayed_size: tuple[int, int]
    ops: Ops
    ops_source: str
    alpha: str
    irregular: bool = False
    source_fps: float | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class _Kept:
    """Frames converted so far, by source index, and what their conversion saw."""

    path: Path
    background: tuple[int, int, int]
    images: dict[int, np.ndarray] = field(default_factory=dict)
    ops: set[Ops] = field(default_factory=set)
    stored_sizes: set[tuple[int, int]] = field(default_factory=set)
    transparent: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, index: int, array: np.ndarray, ops: Ops) -> None:
        """`array`: (h, w, 3 or 4) as stored, uint8 (or float 0..255); alpha, when present, last."""
        self.stored_sizes.add(array.shape[:2])
        self.ops.add(ops)
        rgb, share = composite(to_display(array, ops), self.background)
        self.images[index] = rgb
        self.transparent.append(share)

    def source(self, indices: list[int], what: str) -> tuple[list[np.ndarray], tuple[int, int], Ops, str]:
        """(frames in `indices` order, stored size, ops, alpha text); VmcError when the frames differ in size."""
        frames = [self.images[i] for i in indices]
        if len({f.shape for f in frames}) > 1 or len(self.stored_sizes) > 1:
            sizes = ", ".join(sorted(map(_wxh, self.stored_sizes)))
            raise VmcError(f"{what} {self.path}: frames differ in size ({sizes}); all frames must have the same size")
        ops = next(iter(self.ops))
        share = float(np.mean(self.transparent)) if self.transparent else 0.0
        alpha = "none"
        if share > 0:
            colour = "#{:02x}{:02x}{:02x}".format(*self.background)
            alpha = f"composited on {colour}, {_percent(share)} transparent"
            self.notes.append(f"{self.path.name}: frames have transparent pixels ({_percent(share)} of the picture); "
                              f"composited onto {colour} (--background to change)")
        return frames, next(iter(self.stored_sizes)), ops, alpha


def _percent(share: float) -> str:
    return "<1%" if share < 0.01 else f"{100 * share:.0f}%"


def to_display(image: np.ndarray, ops: Ops) -> np.ndarray:
    """(h, w, C) as stored -> as shown: transpose, then flip left-right, then top-bottom (the `Ops` order)."""
    transpose, hflip, vflip = ops
    if transpose:
        image = image.swapaxes(0, 1)
    if hflip:
        image = image[:, ::-1]
    if vflip:
        image = image[::-1]
    return np.ascontiguousarray(image)


def composite(image: np.ndarray, background: tuple[int, int, int]) -> tuple[np.ndarray, float]:
    """(h, w, 3 or 4) 0..255 -> ((h, w, 3) float32 0..255, share of pixels with alpha < 255).

    RGBA is composited over the background (straight alpha): rgb * a + background * (1 - a), a = alpha / 255,
    so what hides under fully transparent pixels never shows.
    """
    if image.shape[-1] == 3:
        return image.astype(np.float32), 0.0
    alpha = image[..., 3:].astype(np.float32) / 255
    rgb = image[..., :3].astype(np.float32) * alpha + np.asarray(background, np.float32) * (1 - alpha)
    return rgb, float((alpha < 1).mean())


# --------------------------------------------------------------------------------------------- videos


def _decode_video(path: Path, sampling: FrameSampling) -> _Source:
    import av

    kept = _Kept(path, background_rgb(sampling.background))
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VmcError(f"video {path}: the file has no video stream; pass a video file")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            frames = _stream_frames(container, stream, path, kept.notes)
            take = _take_by_index if sampling.fps is None else _take_by_time
            indices, times, num_available = take(frames, stream, sampling, path, kept)
            pixel_aspect = stream.sample_aspect_ratio
    except VmcError:
        raise
    except (av.error.FFmpegError, OSError, ValueError, EOFError) as exc:
        raise VmcError(f"video {path}: cannot be decoded ({type(exc).__name__}: {exc}); check that it is a "
                       f"valid {path.suffix or 'video'} file, or re-encode it, e.g. with ffmpeg") from exc
    frames, stored, ops, alpha = kept.source(indices, "video")
    irregular, source_fps, timing_note = _timing(path, times, sampling)
    return _Source(
        frames=frames, indices=indices, times=[times[i] for i in indices] if None not in times else None,
        num_available=num_available, stored_size=stored,
        displayed_size=_square_pixels(frames[0].shape[:2], pixel_aspect, ops), ops=ops, ops_source="display matrix",
        alpha=alpha, irregular=irregular, source_fps=source_fps, notes=[*kept.notes, *timing_note],
    )


def _stream_frames(container, stream, path: Path, notes: list[str]) -> Iterable:
    """The stream's decoded frames. VP8/VP9 keep transparency in a side channel that only libvpx decodes (FFmpeg's
    own decoder drops it), so such WebM streams go through libvpx when this FFmpeg has it."""
    codec = stream.codec_context.name
    if stream.metadata.get("alpha_mode") != "1" or codec not in ("vp8", "vp9"):
        return container.decode(stream)
    import av

    try:
        decoder = av.CodecContext.create("libvpx-vp9" if codec == "vp9" else "libvpx", "r")
    except (av.error.FFmpegError, ValueError):
        notes.append(f"{path.name}: its {codec.upper()} stream has transparency, but this FFmpeg has no libvpx "
                     f"decoder to read it; transparent pixels are used as stored. Export PNG frames instead")
        return container.decode(stream)
    return _libvpx_frames(container, stream, decoder)


def _libvpx_frames(container, stream, decoder) -> Iterator:
    for packet in container.demux(stream):
        if packet.size:  # the empty packet at the end is a flush marker, which this decoder refuses
            yield from decoder.decode(packet)
    yield from decoder.decode(None)


def _frame_array(frame) -> np.ndarray:
    """(h, w, 3) uint8 RGB as stored, or (h, w, 4) RGBA when the pixel format has alpha or a palette (GIF)."""
    fmt = frame.format
    if fmt.has_palette or any(component.is_alpha for component in fmt.components):
        return frame.to_ndarray(format="rgba")
    return frame.to_ndarray(format="rgb24")


def _display_ops(frame, path: Path, notes: list[str]) -> Ops:
    """How to turn the frame upright, from its DISPLAYMATRIX side data (the 3x3 matrix of 16.16 fixed-point
    int32 that phones and editors write; what FFmpeg's own autorotate reads)."""
    from av.sidedata.sidedata import Type

    data = frame.side_data.get(Type.DISPLAYMATRIX)
    if data is None:
        return False, False, False
    m = np.frombuffer(bytes(data), dtype=np.int32)
    a, b, c, d = (round(m[i] / 65536) for i in (0, 1, 3, 4))
    # As ffmpeg's autorotate (fftools, get_rotation/transpose choice): the matrix's right angle, with flips.
    if a == 0 and d == 0 and abs(b) == abs(c) == 1:
        return True, c < 0, b < 0
    if b == 0 and c == 0 and abs(a) == abs(d) == 1:
        return False, a < 0, d < 0
    notes.append(f"{path.name}: its display rotation of {frame.rotation:.0f}° is not a multiple of 90°; frames "
                 f"are used as stored. Rotate the video in an editor first")
    return False, False, False


def _keep(kept: _Kept, index: int, frame, path: Path) -> None:
    if index not in kept.images:
        kept.add(index, _frame_array(frame), _display_ops(frame, path, kept.notes))


def _frame_time(frame, stream) -> float | None:
    return None if frame.pts is None else float(frame.pts * stream.time_base)


def _take_by_index(frames: Iterable, stream, sampling: FrameSampling, path: Path,
                   kept: _Kept) -> tuple[list[int], list[float | None], int | None]:
    """Decode up to the last sampled frame, converting only the sampled ones.

    Returns (source indices taken, times of every decoded frame, frames in the source or None if unknown)."""
    wanted = sampling.positions
    wanted_set, last = set(wanted), wanted[-1]
    times: list[float | None] = []
    for index, frame in enumerate(frames):
        times.append(_frame_time(frame, stream))
        if index in wanted_set:
            _keep(kept, index, frame, path)
        if index >= last:
            return wanted, times, stream.frames or None
    _check_enough(path, len(times), sampling)  # the stream ended early
    return wanted, times, len(times)


def _take_by_time(frames: Iterable, stream, sampling: FrameSampling, path: Path,
                  kept: _Kept) -> tuple[list[int], list[float | None], int | None]:
    """Resample the timeline at `sampling.fps`: tick k (at t0 + k / fps) takes the frame shown then, the last
    one stamped at or before it. Converts only the frames taken; a frame held over several ticks repeats.

    Returns (source index per sampled tick, times of every decoded frame, frames in the source or None)."""
    ticks, fps = sampling.positions, sampling.fps
    chosen: list[int] = []
    times: list[float] = []
    previous = None
    for index, frame in enumerate(frames):
        time = _frame_time(frame, stream)
        if time is None:
            raise VmcError(f"video {path}: its frames carry no timestamps, so --fps cannot sample it by time; "
                           f"drop --fps to take frames by index")
        while previous is not None and len(chosen) < len(ticks) and \
                times[0] + ticks[len(chosen)] / fps < time - TIME_EPS:  # `previous` is still shown at that tick
            _keep(kept, index - 1, previous, path)
            chosen.append(index - 1)
        if len(chosen) == len(ticks):
            return chosen, times, stream.frames or None
        times.append(time)
        previous = frame
    if previous is None:
        raise VmcError(f"video {path}: has no frames; pass another video")
    end = times[-1] + _frame_duration(previous, stream, times)  # the last frame is shown until its end
    while len(chosen) < len(ticks) and times[0] + ticks[len(chosen)] / fps < end - TIME_EPS:
        _keep(kept, len(times) - 1, previous, path)
        chosen.append(len(times) - 1)
    if len(chosen) < len(ticks):
        raise VmcError(
            f"video {path}: {end - times[0]:.2f} s long, but --fps {fps:g} with {sampling.num_frames} frames, "
            f"stride {sampling.stride} from {sampling.start} needs more than {ticks[-1] / fps:.2f} s; lower "
            f"--frames, --frame-stride, --start-frame or --fps")
    return chosen, times, len(times)


def _frame_duration(frame, stream, times: list[float]) -> float:
    if frame.duration:
        return float(frame.duration * stream.time_base)
    return float(np.median(np.diff(times))) if len(times) > 1 else 0.0


def _timing(path: Path, times: list[float | None], sampling: FrameSampling) -> tuple[bool, float | None, list[str]]:
    """(irregular, source fps, notes) from the decoded frames' times.

    Irregular: some frame lasts over 1.5x, or under 1/1.5, the median duration (this tolerates the 33/34 ms jitter
    of 30 fps stamped in milliseconds but catches variable frame rates and GIFs whose optimiser merged held
    frames into one long frame)."""
    if len(times) < 2 or None in times:
        return False, None, []
    durations = np.diff(np.asarray(times, dtype=np.float64))
    median = float(np.median(durations))
    if median <= 0:
        return True, None, []
    irregular = durations.size >= 2 and (durations.max() > 1.5 * median or durations.min() < median / 1.5)
    notes = []
    if irregular and sampling.fps is None:
        notes.append(f"{path.name}: frame timestamps are irregular (frames last {durations.min():.2f}-"
                     f"{durations.max():.2f} s: a variable frame rate or a GIF whose repeated frames were merged); "
                     f"frames are taken by index, so the motion's speed is distorted. Pass --fps "
                     f"{max(1, round(1 / median))} to sample by time")
    return bool(irregular), 1 / median, notes


def _square_pixels(upright: tuple[int, int], pixel_aspect, ops: Ops) -> tuple[int, int]:
    """Displayed (h, w) of upright frames whose stored pixels are `pixel_aspect` (width / height) wide: the
    stored width is stretched, which after a transpose is the displayed height."""
    if not pixel_aspect or pixel_aspect == 1:
        return upright
    h, w = upright
    if ops[0]:
        return max(1, round(h * pixel_aspect)), w
    return h, max(1, round(w * pixel_aspect))


# --------------------------------------------------------------------------------------------- frame folders


def _read_frame_folder(path: Path, sampling: FrameSampling) -> _Source:
    files = _image_files(path)
    notes = _clashing_numbers(path, files)
    if sampling.fps is not None:
        notes.append(f"--fps: ignored for frame folder {path} (images carry no timestamps); frames are taken by "
                     f"index")
    _check_enough(path, len(files), sampling)
    kept = _Kept(path, background_rgb(sampling.background), notes=notes)
    indices = sampling.positions
    for index in indices:  # only the sampled files are opened
        kept.add(index, *_read_image(files[index]))
    frames, stored, ops, alpha = kept.source(indices, "frame folder")
    return _Source(frames=frames, indices=indices, times=None, num_available=len(files), stored_size=stored,
                   displayed_size=frames[0].shape[:2], ops=ops, ops_source="EXIF orientation", alpha=alpha,
                   notes=kept.notes)


def _read_image(file: Path) -> tuple[np.ndarray, Ops]:
    """(pixels as stored: (h, w, 3|4) uint8 or float32 0..255, EXIF orientation ops)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as image:
            ops = EXIF_ORIENTATION.get(image.getexif().get(0x0112, 1), (False, False, False))
            return _image_array(image, file), ops
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise VmcError(f"frame {file}: not a readable image ({exc}); remove or replace it") from exc


def _image_array(image, file: Path) -> np.ndarray:
    """(h, w, 3) RGB or (h, w, 4) RGBA, 0..255. 16-bit grey ("I;16", "I") is scaled by 255/65535, since
    converting it to RGB would saturate it to white; anything with alpha or a transparent colour keeps it."""
    if image.mode == "F":
        raise VmcError(f"frame {file}: a 32-bit float image; export 8- or 16-bit frames (PNG)")
    if image.mode.startswith("I"):
        raw = np.asarray(image)
        grey = raw.astype(np.float32) * (255 / 65535)
        channels = [grey] * 3
        if "transparency" in image.info:
            channels.append(np.where(raw == image.info["transparency"], 0.0, 255.0).astype(np.float32))
        return np.stack(channels, axis=-1)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        return np.asarray(image.convert("RGBA"))
    return np.asarray(image.convert("RGB"))


def _check_enough(path: Path, num_available: int, sampling: FrameSampling) -> None:
    if num_available < sampling.num_source_frames:
        raise VmcError(
            f"video {path}: has {num_available} frames but {sampling.num_source_frames} are needed "
            f"({sampling.num_frames} frames, stride {sampling.stride}, start {sampling.start}); "
            f"lower --frames or --frame-stride or --start-frame, or use a longer clip")

# --------------------------------------------------------------------------------------------- writing


def frames_to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """(3, F, H, W) float in [-1, 1] -> (F, H, W, 3) uint8."""
    return ((frames.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0)


def write_gif(frames: torch.Tensor, path: str | Path, fps: int = 8) -> Path:
    """Write (3, F, H, W) frames in [-1, 1] as a looping gif."""
    from PIL import Image

    path = Path(path)
    images = [Image.fromarray(f.numpy()) for f in frames_to_uint8(frames)]
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    return path


def _pad_even(video: torch.Tensor) -> torch.Tensor:
    """(F, H, W, 3) uint8 -> same with even H and W (edge pixels repeated), as yuv420p needs."""
    pad_h, pad_w = video.shape[1] % 2, video.shape[2] % 2
    if pad_h:
        video = torch.cat([video, video[:, -1:]], dim=1)
    if pad_w:
        video = torch.cat([video, video[:, :, -1:]], dim=2)
    return video


def write_mp4(frames: torch.Tensor, path: str | Path, fps: int = 8) -> Path:
    """Write (3, F, H, W) frames in [-1, 1] as an mp4 (libx264, or mpeg4 where libx264 is missing)."""
    import av

    path = Path(path)
    video = _pad_even(frames_to_uint8(frames)).contiguous().numpy()
    with av.open(str(path), mode="w") as container:
        try:
            stream = container.add_stream("libx264", rate=fps, options={"crf": "12"})
        except Exception:  # codec not built into this PyAV
            stream = container.add_stream("mpeg4", rate=fps)
            stream.bit_rate = 4_000_000
        stream.height, stream.width = video.shape[1], video.shape[2]
        stream.pix_fmt = "yuv420p"
        for image in video:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    return path


def write_video(frames: torch.Tensor, path: str | Path, fps: int = 8) -> Path:
    """Write (3, F, H, W) frames in [-1, 1] as .gif or .mp4, chosen by the path's suffix (ValueError otherwise)."""
    path = Path(path)
    if path.suffix.lower() == ".gif":
        return write_gif(frames, path, fps)
    if path.suffix.lower() != ".mp4":
        raise ValueError(f"path must end in .mp4 or .gif, got {str(path)!r}")
    return write_mp4(frames, path, fps)


def write_video_atomic(frames: torch.Tensor, path: str | Path, fps: int = 8) -> Path:
    """`write_video` through a temporary file in the same folder and a rename: a crash or a failing encoder
    leaves no file (and no temporary file) at `path`."""
    path = Path(path).expanduser()
    with atomic_path(path) as tmp:
        write_video(frames, tmp, fps)
    return path
