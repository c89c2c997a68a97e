"""Video in and out: find the videos, decode them (PyAV or frame folders), sample frames, resize, scale to
[-1, 1]; write frames as gif or mp4.

Every failure to read raises VmcError naming the file and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vmc_fast.errors import VmcError
from vmc_fast.io.files import atomic_path

VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".gif", ".mkv", ".avi", ".m4v")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class FrameSampling:
    """Which source frames to take and at what size."""

    num_frames: int
    """Frames to keep."""
    height: int | None
    """Output height in pixels; None keeps the source's (or follows `width` at the source's aspect)."""
    width: int | None
    """Output width in pixels; None keeps the source's (or follows `height` at the source's aspect)."""
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


def load_video(path: str | Path, num_frames: int = 8, height: int | None = None, width: int | None = None,
               frame_stride: int = 1, start_frame: int = 0, reverse: bool = False,
               resize: str = "crop") -> torch.Tensor:
    """One video file or frame folder as a clip: float32 (C=3, F, H, W) in [-1, 1].

    Takes `num_frames` frames, every `frame_stride`-th from `start_frame`; `reverse` plays them backwards.
    height/width None keep the video's displayed size (one of them alone keeps its aspect); otherwise ``crop``
    centre-crops to the target aspect before resizing, ``squash`` stretches.
    Raises VmcError for an unreadable or too short video, ValueError for a bad argument (named).
    """
    if num_frames < 1 or frame_stride < 1 or start_frame < 0:
        raise ValueError(f"load_video: num_frames ({num_frames}) and frame_stride ({frame_stride}) must be at least "
                         f"1 and start_frame ({start_frame}) 0 or more")
    if any(v is not None and v < 1 for v in (height, width)) or resize not in ("crop", "squash"):
        raise ValueError(f"load_video: height/width must be positive or None and resize 'crop' or 'squash', got "
                         f"{height}, {width}, {resize!r}")
    return load_clip(path, FrameSampling(num_frames=num_frames, height=height, width=width, stride=frame_stride,
                                         start=start_frame, resize=resize, reverse=reverse))


def load_clip(path: str | Path, sampling: FrameSampling) -> torch.Tensor:
    """Decode, sample and resize one video: float32 (3, F, H, W) in [-1, 1]."""
    path = Path(path)
    frames = _read_frame_folder(path, sampling) if path.is_dir() else _decode_video(path, sampling)
    frames = frames[sampling.start::sampling.stride][: sampling.num_frames]
    clip = torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2).float()  # (3, F, h, w), 0..255
    clip = resize_clip(clip, *_target_size(clip.shape[-2:], sampling), sampling.resize)
    if sampling.reverse:
        clip = clip.flip(1)
    return (clip / 127.5 - 1.0).clamp(-1, 1).contiguous()


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
