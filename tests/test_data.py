import numpy as np
import pytest
import torch

from conftest import moving_square_frames, write_frame_folder, write_video
from vmc_fast.errors import VmcError
from vmc_fast.io.video import (
    FrameSampling,
    center_crop_to_aspect,
    find_videos,
    load_clip,
)


@pytest.mark.parametrize("suffix", [".mp4", ".gif", ".webm", ".mov"])
def test_video_formats_decode_to_the_model_size(tmp_path, suffix):
    video = write_video(tmp_path / f"clip{suffix}", moving_square_frames())
    clip = load_clip(video, FrameSampling(num_frames=8, height=16, width=24))
    assert clip.shape == (3, 8, 16, 24) and clip.dtype == torch.float32
    assert clip.min() >= -1 and clip.max() <= 1


def test_frame_folder_stride_start_and_reverse(tmp_path):
    frames = moving_square_frames(num_frames=12, height=32, width=48)
    folder = write_frame_folder(tmp_path / "frames", frames)
    sampling = FrameSampling(num_frames=4, height=32, width=48, stride=2, start=1, resize="squash")
    clip = load_clip(folder, sampling)
    expected = torch.from_numpy(frames[1:8:2]).permute(3, 0, 1, 2).float() / 127.5 - 1
    assert torch.allclose(clip, expected, atol=1e-6)  # lossless PNG, same size: exact frames
    reversed_clip = load_clip(folder, FrameSampling(4, 32, 48, stride=2, start=1, resize="squash", reverse=True))
    assert torch.equal(reversed_clip, clip.flip(1))


def test_crop_keeps_aspect_and_squash_stretches(tmp_path):
    frames = np.zeros((8, 30, 60, 3), dtype=np.uint8)
    frames[:, :, :15] = 255  # a white band on the left quarter
    folder = write_frame_folder(tmp_path / "f", frames)
    cropped = load_clip(folder, FrameSampling(8, 16, 16, resize="crop"))
    squashed = load_clip(folder, FrameSampling(8, 16, 16, resize="squash"))
    # The centre square crop (columns 15..45) excludes the band; squashing keeps it in the left quarter.
    assert cropped.max() < -0.9
    assert squashed[:, :, :, :3].min() > 0.9
    assert center_crop_to_aspect(torch.zeros(3, 30, 60), 0.5).shape == (3, 30, 60)


def test_find_videos(tmp_path):
    write_video(tmp_path / "b.mp4", moving_square_frames())
    write_video(tmp_path / "a.gif", moving_square_frames())
    write_frame_folder(tmp_path / "c", moving_square_frames())
    (tmp_path / "notes.md").write_text("ignored")
    assert [p.name for p in find_videos(tmp_path)] == ["a.gif", "b.mp4", "c"]
    assert find_videos(tmp_path / "c") == [tmp_path / "c"]


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing.mp4", "no such file"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "holds no videos"),
    (lambda p: (p / "x.txt").write_text("hi") and p / "x.txt", "not a video file"),
])
def test_find_videos_errors(tmp_path, make, message):
    with pytest.raises(VmcError, match=message):
        find_videos(make(tmp_path))


def test_text_file_named_mp4_and_too_few_frames(tmp_path):
    fake = tmp_path / "fake.mp4"
    fake.write_text("this is not a video")
    with pytest.raises(VmcError, match="fake.mp4: cannot be decoded"):
        load_clip(fake, FrameSampling(8, 16, 16))
    short = write_video(tmp_path / "short.mp4", moving_square_frames(num_frames=5))
    with pytest.raises(VmcError, match="has 5 frames but 8 are needed"):
        load_clip(short, FrameSampling(8, 16, 16))
