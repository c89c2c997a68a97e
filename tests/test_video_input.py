"""Video input as people feed it (issue 12, "Video input"): phone rotation and mirrors, EXIF orientation, frame
folders numbered without padding, long clips sampled late, transparency, irregular timestamps, and a record of
what was taken. Inputs are written here with PyAV/PIL, or copied from shared/cases (tests/fixtures/cases)."""

from __future__ import annotations

import fractions
import inspect
import json
import struct
import subprocess
import sys
import warnings
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

import vmc_fast
import vmc_fast.io.video as video_module
from conftest import moving_square_frames, write_video
from vmc_fast.config import DataConfig
from vmc_fast.errors import VmcError, VmcWarning
from vmc_fast.io.video import FrameSampling, find_videos, load_clip, natural_key, read_clip

CASES = Path(__file__).parent / "fixtures" / "cases"


def _encode(path: Path, frames: np.ndarray, *, codec: str = "mpeg4", pix_fmt: str = "yuv420p", fps: int = 8,
            in_format: str = "rgb24", setup=None) -> Path:
    """Encode (F, H, W, C) uint8 frames; `setup(stream)` runs before the first frame (display matrix, SAR)."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = pix_fmt
        if codec == "mpeg4":
            stream.bit_rate = 4_000_000
        if setup is not None:
            setup(stream)
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format=in_format)))
        container.mux(stream.encode())
    return path


def _raw_frames(path: Path) -> np.ndarray:
    """(F, h, w, 3) uint8 as stored: PyAV's plain decode, no orientation applied."""
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def _pixels(clip: torch.Tensor) -> np.ndarray:
    """(3, F, H, W) in [-1, 1] -> (F, H, W, 3) float 0..255."""
    return ((clip + 1) * 127.5).permute(1, 2, 3, 0).numpy()


def _red_mask(image: np.ndarray) -> np.ndarray:
    return (image[..., 0] > 150) & (image[..., 1] < 100) & (image[..., 2] < 100)


@contextmanager
def _no_vmc_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error", VmcWarning)
        yield


# --------------------------------------------------------------------------------------------- A1 orientation


@pytest.mark.parametrize("vflip", [False, True], ids=["", "vflip"])
@pytest.mark.parametrize("hflip", [False, True], ids=["", "hflip"])
@pytest.mark.parametrize("degrees", [0, 90, -90, 180])
def test_display_matrix_turns_frames_as_a_player_shows_them(tmp_path, degrees, hflip, vflip):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (4, 32, 48, 3), dtype=np.uint8)
    path = _encode(tmp_path / "phone.mp4", frames,
                   setup=lambda s: s.set_display_rotation(degrees, hflip=hflip, vflip=vflip))
    raw = _raw_frames(path)
    # The writer's meaning: rotate `degrees` counter-clockwise (np.rot90's sense), then mirror.
    expected = np.rot90(raw, degrees // 90, axes=(1, 2))
    expected = expected[:, :, ::-1] if hflip else expected
    expected = expected[:, ::-1] if vflip else expected
    clip, info = read_clip(path, FrameSampling(4, None, None, resize="squash"))
    assert clip.shape == (3, 4, *expected.shape[1:3])
    assert clip.shape[2:] == ((48, 32) if degrees in (90, -90) else (32, 48))
    torch.testing.assert_close(clip, torch.from_numpy(expected.copy()).permute(3, 0, 1, 2).float() / 127.5 - 1,
                               rtol=0, atol=1e-6)  # a pure permutation of the decoded pixels
    assert info.displayed_size == tuple(expected.shape[1:3]) and info.stored_size == (32, 48)
    assert (info.transform == "none") == np.array_equal(expected, raw)  # 180° and both mirrors cancel out


def test_the_phone_case_plays_upright_and_moves_up():
    clip, info = read_clip(CASES / "rotated_90_phone.mp4", FrameSampling(8, None, None))
    images = _pixels(clip)
    assert clip.shape[2:] == (96, 64)  # shown portrait: 64 wide, 96 high
    blue = (images[0, ..., 2] > 150) & (images[0, ..., 0] < 100)
    assert np.nonzero(blue)[0].max() < 10  # the bar that marks the top edge is at the top
    rows = [np.nonzero(_red_mask(image))[0].mean() for image in images]
    assert all(b < a for a, b in zip(rows, rows[1:]))  # the square moves up
    assert info.transform == "rot90cw" and info.stored_size == (64, 96) and info.displayed_size == (96, 64)
    assert "turned 90° clockwise (stored 96x64, shown 64x96)" in info.summary()


def test_a_rotation_that_is_not_a_right_angle_warns_and_uses_frames_as_stored(tmp_path):
    frames = moving_square_frames(num_frames=4)
    path = _encode(tmp_path / "tilted.mp4", frames, setup=lambda s: s.set_display_rotation(45))
    with pytest.warns(VmcWarning, match="tilted.mp4: its display rotation of .*not a multiple of 90"):
        clip, info = read_clip(path, FrameSampling(4, None, None))
    assert clip.shape[2:] == frames.shape[1:3] and info.transform == "none"


@pytest.mark.parametrize("orientation", range(1, 9))
def test_jpeg_exif_orientation_in_a_frame_folder(tmp_path, orientation):
    from PIL import Image, ImageOps

    folder = tmp_path / "jpegs"
    folder.mkdir()
    rng = np.random.default_rng(orientation)
    for i in range(3):
        exif = Image.Exif()
        exif[0x0112] = orientation
        Image.fromarray(rng.integers(0, 256, (20, 40, 3), dtype=np.uint8)).save(folder / f"{i}.jpg", exif=exif,
                                                                               quality=95)
    expected = []
    for i in range(3):
        with Image.open(folder / f"{i}.jpg") as image:
            expected.append(np.asarray(ImageOps.exif_transpose(image).convert("RGB")))  # PIL's reading, the oracle
    clip, info = read_clip(folder, FrameSampling(3, None, None, resize="squash"))
    assert clip.shape[2:] == expected[0].shape[:2] == ((40, 20) if orientation >= 5 else (20, 40))
    torch.testing.assert_close(clip, torch.from_numpy(np.stack(expected)).permute(3, 0, 1, 2).float() / 127.5 - 1,
                               rtol=0, atol=1e-6)
    assert info.transform_source == ("EXIF orientation" if orientation > 1 else "")


def test_non_square_pixels_are_made_square(tmp_path):
    frames = np.zeros((4, 32, 32, 3), dtype=np.uint8)
    frames[:, :, :16] = 255  # left half white: stays the left half when stretched
    path = _encode(tmp_path / "anamorphic.mp4", frames,
                   setup=lambda s: setattr(s.codec_context, "sample_aspect_ratio", fractions.Fraction(2, 1)))
    clip, info = read_clip(path, FrameSampling(4, None, None))
    assert clip.shape[2:] == (32, 64) and info.displayed_size == (32, 64) and info.stored_size == (32, 32)
    assert _pixels(clip)[0, 16, 8].min() > 200 and _pixels(clip)[0, 16, 56].max() < 50
    assert "non-square pixels made square (stored 32x32, shown 64x32)" in info.summary()


# --------------------------------------------------------------------------------------------- A2 frame order


def _grey_folder(folder: Path, names: list[str]) -> Path:
    """Frame i holds grey level 20 * (i + 1), written under names[i]."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.fromarray(np.full((8, 8, 3), 20 * (i + 1), dtype=np.uint8)).save(folder / name, quality=95)
    return folder


def _grey_levels(clip: torch.Tensor) -> list[float]:
    return [float(v) for v in _pixels(clip).mean(axis=(1, 2, 3))]


@pytest.mark.parametrize("pattern", ["frame_{}.png", "{}.png", "img{}.jpg", "take2_frame_{}.png", "Shot {}.PNG"])
def test_frame_numbers_sort_as_numbers(tmp_path, pattern):
    folder = _grey_folder(tmp_path / "frames", [pattern.format(i) for i in range(1, 13)])
    levels = _grey_levels(load_clip(folder, FrameSampling(12, None, None, resize="squash")))
    assert all(b > a + 10 for a, b in zip(levels, levels[1:])), levels
    assert [p.name for p in video_module._image_files(folder)] == [pattern.format(i) for i in range(1, 13)]


def test_the_unpadded_case_moves_right_in_order():
    images = _pixels(load_clip(CASES / "unpadded_frame_numbers", FrameSampling(12, None, None)))
    xs = [np.nonzero(_red_mask(image))[1].mean() for image in images]
    assert all(b > a for a, b in zip(xs, xs[1:])), xs


def test_dot_files_are_skipped_and_videos_are_found_in_numeric_order(tmp_path):
    folder = _grey_folder(tmp_path / "frames", [f"frame_{i}.png" for i in range(1, 5)])
    (folder / "._frame_1.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble, not a PNG")
    (folder / ".DS_Store").write_bytes(b"\x00")
    assert _grey_levels(load_clip(folder, FrameSampling(4, None, None))) == pytest.approx([20, 40, 60, 80], abs=1)
    library = tmp_path / "library"
    library.mkdir()
    for name in ("clip10.mp4", "clip2.mp4", "._clip2.mp4", "clip1.gif"):
        (library / name).write_bytes(b"")
    (library / ".hidden").mkdir()
    _grey_folder(library / ".hidden", ["1.png"])
    assert [p.name for p in find_videos(library)] == ["clip1.gif", "clip2.mp4", "clip10.mp4"]


def test_names_that_share_a_number_warn(tmp_path):
    folder = _grey_folder(tmp_path / "frames", ["frame_1.png", "frame_01.png", "frame_2.png"])
    with pytest.warns(VmcWarning, match=r"frame_01.png and frame_1.png share the number 1"):
        load_clip(folder, FrameSampling(2, None, None))


def test_natural_key_compares_mixed_names():
    names = ["b2", "a10", "a2", "10", "9", "a", "A3"]
    assert sorted(names, key=natural_key) == ["9", "10", "a", "a2", "A3", "a10", "b2"]


# --------------------------------------------------------------------------------------------- A3 memory


def _count_conversions(monkeypatch) -> list[int]:
    calls = []
    original = video_module._frame_array

    def counting(frame):
        calls.append(1)
        return original(frame)

    monkeypatch.setattr(video_module, "_frame_array", counting)
    return calls


def test_only_the_sampled_frames_are_converted(tmp_path, monkeypatch):
    frames = np.stack([np.full((240, 320, 3), i, dtype=np.uint8) for i in range(200)])
    path = write_video(tmp_path / "long.mp4", frames)
    calls = _count_conversions(monkeypatch)
    clip, info = read_clip(path, FrameSampling(8, None, None, start=150, stride=6))
    assert len(calls) == 8 and info.frame_indices == tuple(range(150, 198, 6))
    expected = torch.from_numpy(_raw_frames(path)[150:198:6]).permute(3, 0, 1, 2).float() / 127.5 - 1
    torch.testing.assert_close(clip, expected, rtol=0, atol=1e-6)  # and they are the right ones


def test_the_long_case_sampled_late_keeps_eight_frames(monkeypatch):
    calls = _count_conversions(monkeypatch)
    clip, info = read_clip(CASES / "long_720p_600frames.mp4", FrameSampling(8, 40, 64, start=560))
    assert len(calls) == 8 and clip.shape == (3, 8, 40, 64)
    assert info.frame_indices == tuple(range(560, 568)) and info.num_available == 600


def test_a_frame_folder_opens_only_the_sampled_files(tmp_path, monkeypatch):
    folder = _grey_folder(tmp_path / "frames", [f"{i}.png" for i in range(1, 13)])
    opened = []
    original = video_module._read_image
    monkeypatch.setattr(video_module, "_read_image", lambda file: opened.append(file.name) or original(file))
    load_clip(folder, FrameSampling(3, None, None, start=5, stride=3))
    assert opened == ["6.png", "9.png", "12.png"]


_RSS_SCRIPT = """
import resource, sys
from vmc_fast.io.video import FrameSampling, load_clip
load_clip(sys.argv[1], FrameSampling(8, 40, 64, start=int(sys.argv[2])))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_start_frame(tmp_path):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (240, 480, 640, 3), dtype=np.uint8)
    path = write_video(tmp_path / "long.mp4", frames)
    del frames

    def peak_kib(start: int) -> int:
        out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(path), str(start)], capture_output=True,
                             text=True, check=True)
        return int(out.stdout.split()[-1])

    # Keeping every decoded frame costs 230 x 0.92 MB = 210 MB more at start 230.
    assert peak_kib(230) - peak_kib(0) < 60 * 1024


# --------------------------------------------------------------------------------------------- A4 transparency

MAGENTA, RED = (255, 0, 255), (255, 0, 0)


def _rgba_frames(num_frames: int = 4, height: int = 32, width: int = 48) -> np.ndarray:
    """Magenta hidden under alpha 0 everywhere but an opaque red square (and an opaque blue top bar)."""
    frames = np.zeros((num_frames, height, width, 4), dtype=np.uint8)
    frames[..., :3] = MAGENTA
    for f in range(num_frames):
        frames[f, 8:16, 4 + 4 * f: 12 + 4 * f] = (*RED, 255)
        frames[f, :4] = (0, 0, 255, 255)
    return frames


def _png_folder(folder: Path, frames: np.ndarray, mode: str = "RGBA") -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(frames):
        image = Image.fromarray(frame, "RGBA")
        if mode == "P":  # palette image with a transparent index
            image = image.convert("RGB").quantize(colors=8)
            palette = np.asarray(image.getpalette()[:24]).reshape(-1, 3)
            image.info["transparency"] = int(np.argmin(np.abs(palette - MAGENTA).sum(1)))
            image.save(folder / f"{i}.png", transparency=image.info["transparency"])
        elif mode == "LA":
            grey = Image.fromarray(frame).convert("LA")
            grey.save(folder / f"{i}.png")
        else:
            image.save(folder / f"{i}.png")
    return folder


def _gif(path: Path, frames: np.ndarray) -> Path:
    from PIL import Image

    images = [Image.fromarray(f, "RGBA") for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=125, loop=0, disposal=2)
    return path


def _alpha_source(kind: str, tmp_path: Path, frames: np.ndarray) -> Path:
    import av

    if kind in ("rgba-png", "palette-png", "la-png"):
        return _png_folder(tmp_path / kind, frames, {"rgba-png": "RGBA", "palette-png": "P", "la-png": "LA"}[kind])
    if kind == "gif":
        return _gif(tmp_path / "clip.gif", frames)
    codec, pix_fmt, suffix = {"png-mov": ("png", "rgba", ".mov"), "qtrle-mov": ("qtrle", "argb", ".mov"),
                              "prores-mov": ("prores_ks", "yuva444p10le", ".mov"),
                              "vp9-webm": ("libvpx-vp9", "yuva420p", ".webm")}[kind]
    if codec not in av.codecs_available:
        pytest.skip(f"this PyAV has no {codec} encoder")
    return _encode(tmp_path / f"clip{suffix}", frames, codec=codec, pix_fmt=pix_fmt, in_format="rgba")


@pytest.mark.parametrize("background, rgb", [("white", (255, 255, 255)), ("#000000", (0, 0, 0)),
                                             ("#00ff00", (0, 255, 0))])
@pytest.mark.parametrize("kind", ["rgba-png", "palette-png", "la-png", "gif", "png-mov", "qtrle-mov", "prores-mov",
                                  "vp9-webm"])
def test_transparent_pixels_are_composited_on_the_background(tmp_path, kind, background, rgb):
    frames = _rgba_frames()
    source = _alpha_source(kind, tmp_path, frames)
    lossy = kind in ("prores-mov", "vp9-webm")
    with pytest.warns(VmcWarning, match="transparent pixels .* composited onto"):
        clip, info = read_clip(source, FrameSampling(4, None, None, background=background))
    images = _pixels(clip)
    hidden = frames[..., 3] == 0
    tolerance = 12 if lossy else 1
    np.testing.assert_allclose(images[hidden], np.broadcast_to(rgb, images[hidden].shape), atol=tolerance)
    if kind != "la-png":  # LA is grey: the square is no longer red
        square = (frames[..., 3] == 255) & (frames[..., 2] == 0)
        np.testing.assert_allclose(images[square], np.broadcast_to(RED, images[square].shape), atol=3 * tolerance)
    assert not ((images[..., 0] > 200) & (images[..., 1] < 60) & (images[..., 2] > 200)).any()  # no magenta
    assert info.alpha.startswith(f"composited on #{''.join(f'{c:02x}' for c in rgb)}")


def test_the_alpha_case_shows_no_magenta_and_says_half_is_transparent():
    with pytest.warns(VmcWarning, match=r"alpha_rgba_png_frames: frames have transparent pixels \(50% of the "
                                        r"picture\); composited onto #ffffff"):
        clip, info = read_clip(CASES / "alpha_rgba_png_frames", FrameSampling(8, None, None))
    images = _pixels(clip)
    assert not ((images[..., 0] > 200) & (images[..., 1] < 60) & (images[..., 2] > 200)).any()
    assert info.alpha == "composited on #ffffff, 50% transparent"


def test_opaque_rgba_frames_give_no_warning(tmp_path):
    frames = _rgba_frames()
    frames[..., 3] = 255
    folder = _png_folder(tmp_path / "opaque", frames)
    with _no_vmc_warnings():
        clip, info = read_clip(folder, FrameSampling(4, None, None))
    assert info.alpha == "none"


def test_a_bad_background_names_the_option():
    with pytest.raises(ValueError, match="--background: 'pink' is not a colour"):
        DataConfig(background="pink")
    with pytest.raises(ValueError, match="background"):
        vmc_fast.load_video(CASES / "alpha_rgba_png_frames", background="#12345")


def _png16(array: np.ndarray, colour_type: int) -> bytes:
    """A 16-bit PNG (PIL cannot write 16-bit RGB): colour type 0 grey, 2 RGB."""
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in array)
    height, width = array.shape[:2]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("colour_type", [0, 2], ids=["grey16", "rgb16"])
def test_16_bit_png_frames_keep_their_levels(tmp_path, colour_type):
    folder = tmp_path / "png16"
    folder.mkdir()
    levels = [0x2000 * (i + 1) for i in range(3)]
    for i, level in enumerate(levels):
        shape = (8, 8) if colour_type == 0 else (8, 8, 3)
        (folder / f"{i}.png").write_bytes(_png16(np.full(shape, level, dtype=np.uint16), colour_type))
    got = _grey_levels(load_clip(folder, FrameSampling(3, None, None)))
    assert got == pytest.approx([level * 255 / 65535 for level in levels], abs=1.0)  # not saturated to white


# --------------------------------------------------------------------------------------------- A5 timing


def _square_at(x: int, height: int = 32, width: int = 48) -> np.ndarray:
    frame = np.full((height, width, 3), 40, dtype=np.uint8)
    frame[10:20, x: x + 8] = RED
    return frame


def _red_left(clip: torch.Tensor) -> list[int]:
    return [int(np.nonzero(_red_mask(image))[1].min()) for image in _pixels(clip)]


def _held_gif(path: Path) -> tuple[Path, list[int]]:
    """16 ticks of 100 ms; the square holds still for ticks 4-11, which PIL merges into one 800 ms frame."""
    from PIL import Image

    xs = [2 * t if t < 4 else (8 if t < 12 else 8 + 2 * (t - 11)) for t in range(16)]
    images = [Image.fromarray(_square_at(x)) for x in xs]
    images[0].save(path, save_all=True, append_images=images[1:], duration=100, loop=0)
    return path, xs


VFR_TIMES = [0, 0.033, 0.066, 0.1, 0.133, 0.2, 0.266, 0.333, 0.4, 0.5, 0.6, 0.7]


def _vfr_mp4(path: Path) -> tuple[Path, list[int]]:
    """12 frames at irregular times (a phone lowering its frame rate); frame k shows the square at 2 + 3k."""
    import av

    xs = [2 + 3 * k for k in range(len(VFR_TIMES))]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=30)
        stream.width, stream.height, stream.pix_fmt, stream.bit_rate = 48, 32, "yuv420p", 4_000_000
        stream.codec_context.time_base = stream.time_base = fractions.Fraction(1, 1000)
        for x, t in zip(xs, VFR_TIMES):
            frame = av.VideoFrame.from_ndarray(_square_at(x), format="rgb24")
            frame.pts, frame.time_base = round(t * 1000), fractions.Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path, xs


def test_a_gif_with_merged_held_frames_warns_and_fps_samples_it_by_time(tmp_path):
    path, xs = _held_gif(tmp_path / "held.gif")
    with pytest.warns(VmcWarning, match=r"held.gif: frame timestamps are irregular \(frames last 0.10-0.80 s.*"
                                        r"Pass --fps 10"):
        clip, info = read_clip(path, FrameSampling(8, None, None))
    assert info.irregular_timing and _red_left(clip) == [0, 2, 4, 6, 8, 10, 12, 14]  # by index: the hold is lost
    with _no_vmc_warnings():
        clip, info = read_clip(path, FrameSampling(16, None, None, fps=10))
    assert _red_left(clip) == xs  # the frame a player shows at 0.0, 0.1, ... s, the hold included
    assert info.timing == "fps=10" and info.frame_times[:6] == pytest.approx([0, 0.1, 0.2, 0.3, 0.4, 0.4])


def test_a_vfr_clip_warns_and_fps_takes_the_frame_shown_at_each_tick(tmp_path):
    path, xs = _vfr_mp4(tmp_path / "vfr.mp4")
    with pytest.warns(VmcWarning, match="vfr.mp4: frame timestamps are irregular"):
        read_clip(path, FrameSampling(8, None, None))
    clip, info = read_clip(path, FrameSampling(7, None, None, fps=10))
    shown = [max(k for k, t in enumerate(VFR_TIMES) if t <= tick / 10 + 1e-6) for tick in range(7)]
    assert list(info.frame_indices) == shown and _red_left(clip) == [xs[k] for k in shown]
    clip, info = read_clip(path, FrameSampling(3, None, None, fps=10, start=2, stride=2))  # ticks 2, 4, 6
    assert list(info.frame_indices) == [shown[2], shown[4], shown[6]]


def test_a_constant_rate_clip_gives_no_timing_warning(square_video):
    with _no_vmc_warnings():
        _, info = read_clip(square_video, FrameSampling(8, None, None))
    assert not info.irregular_timing and info.source_fps == pytest.approx(8)


def test_fps_on_a_frame_folder_is_ignored_with_a_warning(tmp_path):
    folder = _grey_folder(tmp_path / "frames", [f"{i}.png" for i in range(4)])
    with pytest.warns(VmcWarning, match="--fps: ignored for frame folder"):
        _, info = read_clip(folder, FrameSampling(4, None, None, fps=10))
    assert info.timing == "index" and "sampled at" not in info.summary()  # what was taken, as it was taken


def test_fps_on_a_too_short_clip_says_how_long_it_is(tmp_path):
    path, _ = _held_gif(tmp_path / "held.gif")
    with pytest.raises(VmcError, match=r"held.gif: 1.60 s long, but --fps 10 with 17 frames"):
        read_clip(path, FrameSampling(17, None, None, fps=10))
    with pytest.raises(ValueError, match="--fps"):
        DataConfig(fps=0)


# --------------------------------------------------------------------------------------------- A6 what was taken


def test_the_clip_info_says_which_frames_and_what_crop(tmp_path):
    path = write_video(tmp_path / "c16_64x48.mp4", moving_square_frames(num_frames=16, height=48, width=64))
    with pytest.warns(VmcWarning, match=r"c16_64x48.mp4: --resize crop keeps 48 of 64 columns \(the sides are cut\); "
                                        r"pass --resize squash, or --height/--width with the clip's 4:3 aspect"):
        clip, info = read_clip(path, FrameSampling(8, 32, 32))
    assert clip.shape == (3, 8, 32, 32)
    assert info.frame_indices == tuple(range(8)) and info.crop_box == (0, 8, 48, 48)
    assert info.displayed_size == (48, 64) and info.output_size == (32, 32) and info.num_available == 16
    summary = info.summary()
    assert "frames 0-7 of 16" in summary and "crop 48x48 at x=8 y=0 of 64x48" in summary and "\n" not in summary
    assert type(info).from_record(json.loads(json.dumps(info.record()))) == info
    _, reversed_info = read_clip(path, FrameSampling(4, 32, 32, start=3, stride=4, reverse=True))
    assert reversed_info.frame_indices == (15, 11, 7, 3) and "reversed" in reversed_info.summary()


def test_training_prints_and_records_what_was_taken(tmp_path):
    from typer.testing import CliRunner

    from vmc_fast.cli import app

    path = write_video(tmp_path / "c16_64x48.mp4", moving_square_frames(num_frames=16, height=48, width=64))
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--videos", str(path), "--prompt", "a square", "--steps", "1",
                                      "--out", str(out), "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    assert "c16_64x48.mp4: frames 0-7 of 16" in result.output and "crop 48x48" in result.output
    entry = json.loads((out / "manifest.jsonl").read_text().splitlines()[0])
    assert entry["frames"] == list(range(8)) and entry["crop_box"] == [0, 8, 48, 48]
    assert entry["displayed_size"] == [48, 64] and entry["clip"]["summary"].startswith("c16_64x48.mp4: frames 0-7")


def test_a_latent_cache_hit_reports_and_warns_like_a_fresh_read(tmp_path, square_video):
    from vmc_fast.config import RunConfig
    from vmc_fast.tuning.session import TuningSession

    session = TuningSession(RunConfig(data=DataConfig(videos=str(square_video)), cache_dir=str(tmp_path / "c")))
    if session.backbone.vae is None:
        pytest.skip("tiny-random has no VAE: nothing is cached")
    with pytest.warns(VmcWarning, match="crop"):
        first, first_info = session.read_input(square_video)
    assert list((tmp_path / "c" / "latents").iterdir())
    with pytest.warns(VmcWarning, match="crop"):
        second, second_info = session.read_input(square_video)
    assert torch.equal(first, second) and first_info == second_info


# --------------------------------------------------------------------------------------------- A7 load_video


def test_load_video_keeps_the_public_signature():
    parameters = list(inspect.signature(vmc_fast.load_video).parameters.values())
    assert [(p.name, p.default) for p in parameters[:8]] == [
        ("path", inspect.Parameter.empty), ("num_frames", 8), ("height", None), ("width", None), ("frame_stride", 1),
        ("start_frame", 0), ("reverse", False), ("resize", "crop")]
    assert all(p.kind == inspect.Parameter.KEYWORD_ONLY for p in parameters[8:])


def test_load_video_shows_the_rotated_case_upright():
    clip = vmc_fast.load_video(CASES / "rotated_90_phone.mp4")
    assert clip.shape == (3, 8, 96, 64) and clip.dtype == torch.float32 and -1 <= clip.min() <= clip.max() <= 1
    assert vmc_fast.load_video(CASES / "rotated_90_phone.mp4", height=48).shape == (3, 8, 48, 32)
    assert vmc_fast.load_video(CASES / "rotated_90_phone.mp4", width=32).shape == (3, 8, 48, 32)


def test_load_video_start_stride_reverse_and_fps(tmp_path):
    folder = _grey_folder(tmp_path / "frames", [f"f{i}.png" for i in range(1, 13)])
    clip = vmc_fast.load_video(folder, num_frames=4, frame_stride=3, start_frame=1)
    assert _grey_levels(clip) == pytest.approx([40, 100, 160, 220], abs=1)
    assert torch.equal(vmc_fast.load_video(folder, 4, frame_stride=3, start_frame=1, reverse=True), clip.flip(1))
    path, xs = _held_gif(tmp_path / "held.gif")
    assert _red_left(vmc_fast.load_video(path, num_frames=8, fps=10)) == xs[:8]


@pytest.mark.parametrize("kwargs, name", [({"num_frames": 0}, "num_frames"), ({"frame_stride": 0}, "frame_stride"),
                                          ({"start_frame": -1}, "start_frame"), ({"height": 0}, "height"),
                                          ({"width": 2.5}, "width"), ({"resize": "zoom"}, "resize"),
                                          ({"fps": 0}, "fps"), ({"background": "pink"}, "background")])
def test_load_video_names_each_bad_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"load_video: {name}"):
        vmc_fast.load_video(CASES / "unpadded_frame_numbers", **kwargs)


def test_generate_reads_its_video_with_the_background_and_sample_fps(tmp_path, monkeypatch, square_video):
    from vmc_fast.config import GenerateConfig
    from vmc_fast.inference import generate

    seen = []

    def spy(path, sampling):
        seen.append(sampling)
        raise RuntimeError("stop here")

    monkeypatch.setattr(video_module, "read_clip", spy)
    cfg = GenerateConfig(video=str(square_video), background="#102030", sample_fps=4, output=None)
    with pytest.raises(RuntimeError, match="stop here"):
        generate._starting_point(cfg, None, {}, (8, 32, 32), torch.device("cpu"), None)
    assert seen[0].background == "#102030" and seen[0].fps == 4
