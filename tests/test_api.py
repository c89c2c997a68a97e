"""The scripting API of `vmc_fast` (its __init__): every public name resolves, and `load_video` keeps its contract."""

import pytest
import torch

import vmc_fast
from conftest import moving_square_frames, write_frame_folder


def test_every_public_name_resolves():
    for name in vmc_fast.__all__:
        assert getattr(vmc_fast, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        vmc_fast.nope  # noqa: B018


def test_load_video_keeps_the_displayed_size_and_samples_frames(tmp_path):
    frames = moving_square_frames(num_frames=10, height=32, width=48)
    folder = write_frame_folder(tmp_path / "clip", frames)
    clip = vmc_fast.load_video(folder)
    assert clip.shape == (3, 8, 32, 48) and clip.dtype == torch.float32
    assert clip.min() >= -1 and clip.max() <= 1
    expected = torch.from_numpy(frames[:8]).permute(3, 0, 1, 2).float() / 127.5 - 1
    torch.testing.assert_close(clip, expected)
    strided = vmc_fast.load_video(folder, num_frames=3, frame_stride=2, start_frame=1)
    torch.testing.assert_close(strided, expected.new_tensor(frames[1:7:2]).permute(3, 0, 1, 2) / 127.5 - 1)
    torch.testing.assert_close(vmc_fast.load_video(folder, num_frames=3, reverse=True),
                               vmc_fast.load_video(folder, num_frames=3).flip(1))


def test_load_video_one_side_keeps_the_aspect(tmp_path):
    folder = write_frame_folder(tmp_path / "clip", moving_square_frames(num_frames=8, height=32, width=48))
    assert vmc_fast.load_video(folder, height=16).shape == (3, 8, 16, 24)
    assert vmc_fast.load_video(folder, width=24).shape == (3, 8, 16, 24)
    assert vmc_fast.load_video(folder, height=16, width=16).shape == (3, 8, 16, 16)


@pytest.mark.parametrize("kwargs", [{"num_frames": 0}, {"frame_stride": 0}, {"start_frame": -1}, {"height": 0},
                                    {"resize": "zoom"}])
def test_load_video_names_a_bad_argument(tmp_path, kwargs):
    folder = write_frame_folder(tmp_path / "clip", moving_square_frames(num_frames=8))
    with pytest.raises(ValueError, match="load_video"):
        vmc_fast.load_video(folder, **kwargs)
