"""Video input: find the videos, decode them (PyAV or frame folders), sample frames, resize, scale to [-1, 1].

Every failure raises VmcError naming the file and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vmc_fast.errors import VmcError

VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".gif", ".mkv", ".avi", ".m4v")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class FrameSampling:
    """Which source frames to take and at what size."""

    num_frames: int
    """Frames to keep."""
    height: int
    """Output height in pixels."""
    width: int
    """Output width in pixels."""
    stride: int = 1
    """Take every k-th source frame."""
    start: int = 0
    """First source frame."""
    resize: str = "crop"
    """``crop`` keeps the aspect (center crop), ``squash`` stretches."""
    reverse: bool = False
    """Reverse the sampled frames."""

    @property
    def num_source_frames(self) -> int:
        return self.start + self.stride * (self.num_frames - 1) + 1


def find_videos(path: str | Path) -> list[Path]:
    """The videos under `path`: a video file, a folder of frame images, or a folder holding those.

    A folder whose own files are images is one video; otherwise each video file and each sub-folder of images
    in it is a video, sorted by name.
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
    videos = sorted(p for p in path.iterdir()
                    if (p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES) or (p.is_dir() and _image_files(p)))
    if not videos:
        raise VmcError(f"--videos {path}: the folder holds no videos ({', '.join(VIDEO_SUFFIXES)}) and no frame "
                       f"images ({', '.join(IMAGE_SUFFIXES)}); add some or point --videos elsewhere")
    return videos


def load_clip(path: str | Path, sampling: FrameSampling) -> torch.Tensor:
    """Decode, sample and resize one video: float32 (3, F, H, W) in [-1, 1]."""
    path = Path(path)
    frames = _read_frame_folder(path, sampling) if path.is_dir() else _decode_video(path, sampling)
    frames = frames[sampling.start::sampling.stride][: sampling.num_frames]
    clip = torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2).float()  # (3, F, h, w), 0..255
    clip = resize_clip(clip, sampling.height, sampling.width, sampling.resize)
    if sampling.reverse:
        clip = clip.flip(1)
    return (clip / 127.5 - 1.0).clamp(-1, 1).contiguous()


def resize_clip(clip: torch.Tensor, height: int, width: int, mode: str) -> torch.Tensor:
    """(3, F, h, w) -> (3, F, height, width); ``crop`` center-crops to the target aspect first."""
    if mode == "crop":
        clip = center_crop_to_aspect(clip, height / width)
    if clip.shape[-2:] == (height, width):
        return clip
    frames = clip.permute(1, 0, 2, 3)  # frames as the batch
    frames = F.interpolate(frames, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return frames.permute(1, 0, 2, 3)


def center_crop_to_aspect(clip: torch.Tensor, aspect: float) -> torch.Tensor:
    """Largest centered crop of (..., h, w) with h / w == aspect (to the nearest pixel)."""
    h, w = clip.shape[-2:]
    crop_h, crop_w = (h, round(h / aspect)) if h / w < aspect else (round(w * aspect), w)
    crop_h, crop_w = max(1, min(crop_h, h)), max(1, min(crop_w, w))
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    return clip[..., top: top + crop_h, left: left + crop_w]


def _decode_video(path: Path, sampling: FrameSampling) -> list[np.ndarray]:
    import av

    needed = sampling.num_source_frames
    frames: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VmcError(f"video {path}: the file has no video stream; pass a video file")
            for frame in container.decode(video=0):
                frames.append(frame.to_ndarray(format="rgb24"))
                if len(frames) >= needed:
                    break
    except VmcError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise VmcError(f"video {path}: cannot be decoded ({type(exc).__name__}: {exc}); check that it is a "
                       f"valid {path.suffix or 'video'} file, or re-encode it, e.g. with ffmpeg") from exc
    _check_enough(path, len(frames), sampling)
    return frames


def _read_frame_folder(path: Path, sampling: FrameSampling) -> list[np.ndarray]:
    from PIL import Image, UnidentifiedImageError

    files = _image_files(path)
    _check_enough(path, len(files), sampling)
    frames = []
    for file in files[: sampling.num_source_frames]:
        try:
            with Image.open(file) as image:
                frames.append(np.asarray(image.convert("RGB")))
        except (UnidentifiedImageError, OSError) as exc:
            raise VmcError(f"frame {file}: not a readable image ({exc}); remove or replace it") from exc
    if len({f.shape for f in frames}) > 1:
        raise VmcError(f"frame folder {path}: frames differ in size; all frames must have the same size")
    return frames


def _check_enough(path: Path, num_available: int, sampling: FrameSampling) -> None:
    if num_available < sampling.num_source_frames:
        raise VmcError(
            f"video {path}: has {num_available} frames but {sampling.num_source_frames} are needed "
            f"({sampling.num_frames} frames, stride {sampling.stride}, start {sampling.start}); "
            f"lower --frames or --frame-stride or --start-frame, or use a longer clip")


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
