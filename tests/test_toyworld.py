"""The toy world renders exactly what its ground truth says: tracks, sizes, motions, captions, files."""

import dataclasses
import json
import random

import pytest
import torch

from vmc_fast.io.video import frames_to_uint8
from vmc_fast.toy import world as tw

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _render(motion: str, seed: int = 0, **kwargs) -> tw.Clip:
    num_frames = kwargs.get("num_frames", 8)
    params = tw.sample_motion_params(motion, random.Random(seed), num_frames)
    return tw.render_clip(tw.ClipSpec(motion=motion, motion_params=params, **kwargs))


def _mask_centroid(mask: torch.Tensor) -> torch.Tensor:
    """(F, H, W) -> (F, 2) coverage-weighted centroid (x, y) in pixel coordinates."""
    height, width = mask.shape[1:]
    area = mask.double().sum((1, 2))
    xs = (mask.double() * torch.arange(width).view(1, 1, -1)).sum((1, 2)) / area
    ys = (mask.double() * torch.arange(height).view(1, -1, 1)).sum((1, 2)) / area
    return torch.stack([xs, ys], 1)


def _steps(clip: tw.Clip) -> torch.Tensor:
    return clip.track.double().diff(dim=0)


@pytest.mark.parametrize("height,width", [(32, 48), (32, 32), (17, 23), (64, 40)])
def test_frames_shape_dtype_and_range(height, width):
    clip = _render("orbit", height=height, width=width, num_frames=5, background="noise")
    assert clip.frames.shape == (3, 5, height, width) and clip.frames.dtype == torch.float32
    assert clip.frames.min() >= -1 and clip.frames.max() <= 1
    assert clip.track.shape == (5, 2) and clip.track.dtype == torch.float32
    assert clip.scale.shape == (5,) and clip.mask.shape == (5, height, width)


@pytest.mark.parametrize("shape", tw.SHAPES)
def test_track_is_the_centroid_of_the_rendered_object(shape):
    for seed, motion in enumerate(["right", "orbit", "zigzag", "zoom-in", "spiral", "bounce"]):
        clip = _render(motion, seed, shape=shape, background="checker")
        inside = tw.inside_image(clip)
        assert inside.all()
        error = (_mask_centroid(clip.mask) - clip.track.double()).abs().amax(1)
        assert error.max() < 0.1, (shape, motion, error)


@pytest.mark.parametrize("shape", tw.SHAPES)
def test_mask_area_and_fill_ratio_match_the_shape(shape):
    clip = _render("zoom-out", shape=shape, height=64, width=64)
    area = clip.mask.double().sum((1, 2))
    expected = tw.AREA_FRACTION[shape] * clip.scale.double() ** 2
    assert torch.allclose(area, expected, rtol=0.03)
    binary = clip.mask[0] >= 0.5
    rows, cols = binary.any(1).nonzero(), binary.any(0).nonzero()
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert abs(float(binary.sum() / box) - tw.FILL_RATIO[shape]) < 0.1


def test_clipped_objects_render_without_error():
    params = tw.MotionParams(center_x=0.02, center_y=0.98, amplitude=0.1, size=0.5)
    clip = tw.render_clip(tw.ClipSpec(motion="right", motion_params=params))
    assert not tw.inside_image(clip).any()
    assert clip.mask.sum() > 0 and torch.isfinite(clip.frames).all()


@pytest.mark.parametrize("height,width", [(32, 48), (32, 32), (48, 32)])
def test_sampled_paths_keep_the_object_inside(height, width):
    rng = random.Random(0)
    for _ in range(200):
        spec = tw.sample_spec(rng, motions=list(tw.MOTION_FAMILIES), height=height, width=width)
        params = spec.resolved_params()
        track, size = tw.spec_path(spec, params)
        assert tw.object_inside(spec.shape, track, size, spec.height, spec.width).all(), spec


@pytest.mark.parametrize(
    "motion,sign_x,sign_y",
    [("left", -1, 0), ("right", 1, 0), ("up", 0, -1), ("down", 0, 1), ("up-left", -1, -1),
     ("up-right", 1, -1), ("down-left", -1, 1), ("down-right", 1, 1)],
)
def test_straight_motions_move_the_right_way(motion, sign_x, sign_y):
    steps = _steps(_render(motion))
    for axis, sign in ((0, sign_x), (1, sign_y)):
        if sign == 0:
            assert steps[:, axis].abs().max() < 1e-4
        else:
            assert (steps[:, axis] * sign > 0.5).all(), (motion, steps)


@pytest.mark.parametrize("motion", ["orbit", "figure-eight"])
def test_closed_paths_return_to_the_start(motion):
    clip = _render(motion)
    track = clip.track.double()
    assert (track[-1] - track[0]).norm() < 1e-3
    assert (track - track[0]).norm(dim=1).max() > 8


def test_orbit_keeps_its_normalised_radius():
    clip = _render("orbit", height=40, width=40)
    centre = torch.tensor([clip.params.center_x, clip.params.center_y], dtype=torch.float64) * 40 - 0.5
    radius = (clip.track.double() - centre).norm(dim=1)
    assert torch.allclose(radius, torch.full_like(radius, clip.params.amplitude * 40), atol=1e-3)


def test_figure_eight_crosses_its_centre_line():
    clip = _render("figure-eight")
    x = clip.track[:, 0] - (clip.params.center_x * clip.spec.width - 0.5)
    assert (x > 1).any() and (x < -1).any()


def test_zooms_change_only_the_size():
    grow, shrink = _render("zoom-in"), _render("zoom-out")
    assert (grow.scale.diff() > 0).all() and (shrink.scale.diff() < 0).all()
    assert grow.scale[-1] > 1.5 * grow.scale[0]
    assert _steps(grow).abs().max() < 1e-4 and _steps(shrink).abs().max() < 1e-4


def test_zigzag_alternates_vertical_direction_while_travelling():
    for seed in range(4):
        steps = _steps(_render("zigzag", seed))
        signs = torch.sign(steps[:, 1])
        assert (signs[1:] * signs[:-1] < 0).all(), steps  # 8 frames: every step turns
        assert (torch.sign(steps[:, 0]) == torch.sign(steps[0, 0])).all()
    long = _steps(_render("zigzag", num_frames=25))
    turns = (torch.sign(long[1:, 1]) * torch.sign(long[:-1, 1]) < 0).sum()
    assert turns >= 2


def test_bounce_falls_back_to_the_floor():
    clip = _render("bounce", seed=1)
    y = clip.track[:, 1].double()
    assert abs(y[0] - y.max()) < 1e-4 and abs(y[-1] - y.max()) < 1e-4  # starts and ends on the floor
    assert y[1] < y[0]  # goes up first (image y grows downwards)
    assert _steps(clip)[:, 0].abs().max() < 1e-4


def test_pingpong_turns_around():
    steps = _steps(_render("pingpong"))
    assert (steps[:, 0] > 0).any() and (steps[:, 0] < 0).any()
    assert steps[:, 1].abs().max() < 1e-4


def test_spiral_winds_outwards():
    clip = _render("spiral", height=48, width=48)
    centre = torch.tensor([clip.params.center_x, clip.params.center_y], dtype=torch.float64) * 48 - 0.5
    offset = clip.track.double() - centre
    assert (offset.norm(dim=1).diff() > 0).all()
    angle = torch.atan2(offset[:, 1], offset[:, 0])
    turn = torch.remainder(angle.diff() * clip.params.direction + torch.pi, 2 * torch.pi) - torch.pi
    assert (turn > 0).all()


def test_every_family_renders_and_moves():
    for motion in tw.MOTION_FAMILIES:
        clip = _render(motion)
        change = _steps(clip).abs().sum() + clip.scale.diff().abs().sum()
        assert change > 3, motion
        assert motion in tw.MOTION_PHRASES


def test_family_split():
    assert set(tw.HELD_OUT_MOTIONS) == {"zigzag", "figure-eight", "spiral"}
    assert set(tw.TRAIN_MOTIONS) | set(tw.HELD_OUT_MOTIONS) == set(tw.MOTION_FAMILIES)
    assert not set(tw.TRAIN_MOTIONS) & set(tw.HELD_OUT_MOTIONS)
    rng = random.Random(1)
    assert {tw.sample_spec(rng).motion for _ in range(40)} <= set(tw.TRAIN_MOTIONS)
    assert {tw.sample_spec(rng, motions=tw.HELD_OUT_MOTIONS).motion for _ in range(20)} <= set(tw.HELD_OUT_MOTIONS)


def test_captions():
    spec = tw.ClipSpec(shape="circle", colour="red", motion="zigzag", background="grey")
    clip = tw.render_clip(spec)
    assert clip.caption == "a red circle moving in a zigzag on a grey background"
    assert clip.motion_caption == "a circle moving in a zigzag"
    rng = random.Random(2)
    for _ in range(20):
        spec = tw.sample_spec(rng, motions=list(tw.MOTION_FAMILIES))
        full, motion = tw.captions(spec)
        assert spec.colour in full and spec.shape in motion and spec.colour not in motion
        assert "background" in full and "background" not in motion


def test_rendering_is_deterministic_from_the_seed():
    a = tw.render_clip(tw.ClipSpec(motion="spiral", background="noise", seed=3))
    b = tw.render_clip(tw.ClipSpec(motion="spiral", background="noise", seed=3))
    c = tw.render_clip(tw.ClipSpec(motion="spiral", background="noise", seed=4))
    assert torch.equal(a.frames, b.frames) and torch.equal(a.track, b.track)
    assert not torch.equal(a.track, c.track)
    assert tw.sample_spec(random.Random(5)) == tw.sample_spec(5)
    assert tw.sample_spec(5) != tw.sample_spec(6)


def test_backgrounds():
    images = {name: tw.background_image(name, 32, 48) for name in tw.BACKGROUNDS}
    for name, image in images.items():
        assert image.shape == (3, 32, 48) and image.min() >= 0 and image.max() <= 1
        assert (image.flatten(1).std(1).max() > 0.01) == (name not in tw.PLAIN_BACKGROUNDS), name
    assert torch.equal(images["noise"], tw.background_image("noise", 32, 48))


@pytest.mark.parametrize(
    "field,value",
    [("shape", "blob"), ("colour", "purple"), ("background", "sky"), ("motion", "teleport"), ("num_frames", 1),
     ("height", 2)],
)
def test_invalid_spec_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        tw.ClipSpec(**{field: value})


def test_spec_round_trips_through_json():
    spec = tw.sample_spec(7)
    again = tw.ClipSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec
    assert torch.equal(tw.render_clip(again).frames, tw.render_clip(spec).frames)
    assert dataclasses.asdict(tw.render_clip(spec).params) == dataclasses.asdict(spec.motion_params)


@pytest.mark.parametrize("suffix", [".mp4", ".gif"])
def test_write_clip(tmp_path, suffix):
    clip = _render("orbit", height=31, width=45, num_frames=6)
    path = tw.write_clip(clip, tmp_path / f"clip{suffix}")
    assert path.exists() and path.stat().st_size > 0
    if suffix == ".mp4":
        import av

        with av.open(str(path)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert len(frames) == 6 and frames[0].shape == (32, 46, 3)  # padded to even for yuv420p
        expected = frames_to_uint8(clip.frames)[0].float()
        assert (torch.from_numpy(frames[0][:31, :45]).float() - expected).abs().mean() < 8
    else:
        from PIL import Image

        with Image.open(path) as image:
            assert image.n_frames == 6 and image.size == (45, 31)
    with pytest.raises(ValueError, match="path"):
        tw.write_clip(clip, tmp_path / "clip.avi")


def test_write_example_folder(tmp_path):
    paths = tw.write_example_folder(tmp_path / "ex", num_clips=3, motions=tw.HELD_OUT_MOTIONS, seed=1,
                                    suffix=".gif", height=24, width=24)
    assert len(paths) == 3
    for path in paths:
        record = json.loads(path.with_suffix(".json").read_text())
        spec = tw.ClipSpec.from_dict(record["spec"])
        clip = tw.render_clip(spec)
        assert spec.motion in tw.HELD_OUT_MOTIONS and (spec.height, spec.width) == (24, 24)
        assert path.with_suffix(".txt").read_text().strip() == clip.motion_caption == record["motion_caption"]
        assert torch.allclose(torch.tensor(record["track"]), clip.track, atol=1e-3)
        assert len(record["scale"]) == spec.num_frames
