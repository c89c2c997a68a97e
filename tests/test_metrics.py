"""Motion-transfer metrics recover toy-world ground truth and rank right and wrong motions and looks apart."""

import dataclasses
import math
import random

import pytest
import torch

from vmc_fast.studies import metrics as M
from vmc_fast.toy import world as tw

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _render(motion: str, seed: int = 0, **kwargs) -> tw.Clip:
    params = tw.sample_motion_params(motion, random.Random(seed), kwargs.get("num_frames", 8))
    return tw.render_clip(tw.ClipSpec(motion=motion, motion_params=params, **kwargs))


# ------------------------------------------------------------------------------------------------ tracks


@pytest.mark.parametrize("background", tw.BACKGROUNDS)
def test_tracks_recover_the_true_centre(background):
    for seed, (shape, colour, motion) in enumerate(
        [("circle", "red", "orbit"), ("triangle", "cyan", "zigzag"), ("cross", "white", "down-left"),
         ("ring", "blue", "spiral")]
    ):
        clip = _render(motion, seed, shape=shape, colour=colour, background=background)
        for estimate in (M.object_track(clip.frames, colour), M.salient_track(clip.frames)):
            assert estimate.found.all()
            assert (estimate.xy - clip.track.double()).abs().max() < 0.35, (background, shape)


def test_object_track_accepts_rgb_and_none():
    clip = _render("right", colour="orange")
    by_name = M.object_track(clip.frames, "orange").xy
    by_rgb = M.object_track(clip.frames, tw.COLOURS["orange"]).xy
    assert torch.equal(by_name, by_rgb)
    assert torch.equal(M.object_track(clip.frames, None).xy, M.salient_track(clip.frames).xy)
    with pytest.raises(ValueError, match="colour"):
        M.object_track(clip.frames, "mauve")


def test_missing_object_is_nan_and_not_found():
    clip = _render("right", colour="green")
    frames = clip.frames.clone()
    frames[:, 2:4] = tw.background_image("grey", 32, 48)[:, None] * 2 - 1
    for estimate in (M.object_track(frames, "green"), M.salient_track(frames), M.object_track(clip.frames, "red")):
        lost = ~estimate.found
        assert torch.isnan(estimate.xy[lost]).all() and (estimate.area[lost] == 0).all()
    assert M.object_track(frames, "green").found.tolist() == [True, True, False, False, True, True, True, True]
    assert not M.object_track(clip.frames, "red").found.any()


def test_size_from_area_matches_rendered_size():
    clip = _render("zoom-in", shape="triangle", height=64, width=64)
    for estimate in (M.object_track(clip.frames, clip.spec.colour), M.salient_track(clip.frames)):
        size = M.size_from_area(estimate.area, "triangle")  # soft edge weights undercount a little
        assert torch.allclose(size, clip.scale.double(), rtol=0.1)


# ------------------------------------------------------------------------------------------------ motion fidelity


def test_perfect_copy_scores_one():
    for motion in tw.MOTION_FAMILIES:
        clip = _render(motion)
        assert M.motion_fidelity(clip.track, clip.track, clip.scale, clip.scale) == pytest.approx(1, abs=1e-6)
        shifted = clip.track + torch.tensor([5.0, -3.0])
        assert M.motion_fidelity(shifted, clip.track, clip.scale, clip.scale) == pytest.approx(1, abs=1e-6)


@pytest.mark.parametrize("motion", ["left", "up-right", "pingpong", "zigzag", "zoom-in", "zoom-out"])
def test_reversed_motion_scores_low(motion):
    clip = _render(motion)
    score = M.motion_fidelity(clip.track.flip(0), clip.track, clip.scale.flip(0), clip.scale)
    assert score < 0.1


@pytest.mark.parametrize(
    "gen,ref", [("right", "up"), ("left", "orbit"), ("zoom-in", "zoom-out"), ("down", "figure-eight"),
                ("orbit", "pingpong"), ("spiral", "bounce")],
)
def test_different_motion_scores_below_half(gen, ref):
    a, b = _render(gen), _render(ref)
    assert M.motion_fidelity(a.track, b.track, a.scale, b.scale) < 0.5


def test_opposite_orbit_scores_below_half():
    ref = _render("orbit")
    params = dataclasses.replace(ref.params, direction=-ref.params.direction)
    mirrored = tw.render_clip(dataclasses.replace(ref.spec, motion_params=params))
    assert M.motion_fidelity(mirrored.track, ref.track) < 0.5


def test_motion_scores_parts_and_missing_frames():
    clip = _render("right")
    scores = M.motion_scores(clip.track, clip.track)
    assert scores.cosine == pytest.approx(1) and scores.l2_error == pytest.approx(0) and scores.coverage == 1
    holes = clip.track.clone()
    holes[3] = math.nan
    partial = M.motion_scores(holes, clip.track)
    assert partial.coverage == pytest.approx(7 / 8) and partial.fidelity == pytest.approx(7 / 8, abs=1e-6)
    assert M.motion_fidelity(torch.full((8, 2), math.nan), clip.track) == 0.0
    still = torch.zeros(8, 2)
    assert M.motion_fidelity(still, still) == pytest.approx(1)
    assert M.motion_fidelity(clip.track, still) < 0.5


def test_motion_fidelity_rejects_bad_inputs():
    with pytest.raises(ValueError, match="track"):
        M.motion_fidelity(torch.zeros(8, 2), torch.zeros(7, 2))
    with pytest.raises(ValueError, match="track"):
        M.motion_fidelity(torch.zeros(8, 3), torch.zeros(8, 3))
    with pytest.raises(ValueError, match="scale"):
        M.motion_fidelity(torch.zeros(8, 2), torch.zeros(8, 2), scale_gen=torch.zeros(8))


@pytest.mark.parametrize("motion", ["zigzag", "figure-eight", "spiral", "zoom-in", "bounce"])
def test_transferred_motion_with_new_appearance_scores_high(motion):
    ref = _render(motion, shape="circle", colour="red", background="grey")
    spec = dataclasses.replace(ref.spec, shape="square", colour="blue", background="checker")
    gen = tw.render_clip(spec)
    report = M.motion_transfer_report(gen.frames, ref, colour="blue", shape="square")
    assert report["motion_fidelity"] > 0.95 and report["found"] == 1
    assert report["colour_adherence"] == 1 and report["shape_adherence"] >= 0.75  # tiny shapes get confused
    blind = M.motion_transfer_report(gen.frames, ref)  # colour unknown: saliency
    assert blind["motion_fidelity"] > 0.95
    other = {"zigzag": "orbit", "figure-eight": "down", "spiral": "left", "zoom-in": "zoom-out", "bounce": "right"}
    wrong = tw.render_clip(dataclasses.replace(spec, motion=other[motion], motion_params=None))
    assert M.motion_transfer_report(wrong.frames, ref, colour="blue")["motion_fidelity"] < 0.6


def test_report_rescales_a_larger_video():
    ref = _render("spiral", height=32, width=48)
    big = tw.render_clip(dataclasses.replace(ref.spec, height=64, width=96))
    assert M.motion_transfer_report(big.frames, ref)["motion_fidelity"] > 0.95


# ------------------------------------------------------------------------------------------------ appearance


@pytest.mark.parametrize("shape", ["circle", "square", "triangle", "cross", "ring"])
def test_appearance_right_and_wrong(shape):
    clip = _render("orbit", shape=shape, colour="yellow", background="stripes")
    right = M.appearance_adherence(clip.frames, "yellow", shape)
    assert right.colour == 1 and right.shape >= 0.75 and right.shape_iou > 0.8
    assert abs(right.fill_ratio - tw.FILL_RATIO[shape]) < 0.12
    for colour in ("red", "blue", "white", "orange"):
        assert M.appearance_adherence(clip.frames, colour).colour == 0
    other = "square" if shape != "square" else "circle"
    assert M.appearance_adherence(clip.frames, "yellow", other).shape <= 0.25


def test_appearance_without_shape_or_object():
    clip = _render("up", colour="magenta")
    scores = M.appearance_adherence(clip.frames, "magenta")
    assert scores.colour == 1 and math.isnan(scores.shape)
    blank = torch.zeros(3, 8, 32, 48)
    empty = M.appearance_adherence(blank, "magenta", "circle")
    assert empty.colour == 0 and empty.shape == 0
    with pytest.raises(ValueError, match="shape"):
        M.appearance_adherence(clip.frames, "magenta", "blob")


# ------------------------------------------------------------------------------------------------ temporal


def test_temporal_consistency():
    clip = _render("right", background="noise")
    still = clip.frames[:, :1].expand(-1, 8, -1, -1)
    assert M.temporal_consistency(still) == pytest.approx(1, abs=1e-9)
    moving = M.temporal_consistency(clip.frames)
    noise = torch.rand(3, 8, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert 0.9 < moving < 1 and M.temporal_consistency(noise) < moving


def test_object_stability():
    steady = M.object_stability(_render("orbit").frames)
    assert steady.found == 1 and steady.area_variation < 0.05 and steady.colour_drift < 0.02
    flicker = _render("orbit", colour="red").frames.clone()
    flicker[:, 1::2] = _render("orbit", colour="cyan").frames[:, 1::2]
    assert M.object_stability(flicker).colour_drift > 0.3
    assert M.object_stability(_render("zoom-in").frames).area_variation > 0.2


# ------------------------------------------------------------------------------------------------ CLIP


@pytest.fixture(scope="module")
def tiny_clip():
    return M.tiny_random_clip(seed=0)


def test_clip_pixel_values():
    frames = torch.zeros(3, 5, 32, 48)
    pixels = M.clip_pixel_values(frames, 24)
    assert pixels.shape == (5, 3, 24, 24) and pixels.dtype == torch.float32
    expected = (0.5 - torch.tensor(M.CLIP_MEAN)) / torch.tensor(M.CLIP_STD)
    assert torch.allclose(pixels[0, :, 12, 12], expected, atol=1e-5)


def test_clip_metrics_with_tiny_random_model(tiny_clip):
    model, tokenizer = tiny_clip
    clip = _render("zigzag")
    scores = M.clip_metrics(clip.frames, clip.caption, model, tokenizer=tokenizer)
    for value in (scores.text_alignment, scores.frame_consistency):
        assert math.isfinite(value) and -1 <= value <= 1
    still = clip.frames[:, :1].expand(-1, 8, -1, -1)
    still_scores = M.clip_metrics(still, clip.caption, model, tokenizer=tokenizer)
    assert still_scores.frame_consistency == pytest.approx(1, abs=1e-5)


def test_clip_metrics_through_a_processor(tiny_clip):
    from types import SimpleNamespace

    model, tokenizer = tiny_clip
    clip = _render("orbit", height=40, width=40)
    processor = SimpleNamespace(tokenizer=tokenizer,
                                image_processor=SimpleNamespace(image_mean=M.CLIP_MEAN, image_std=M.CLIP_STD))
    direct = M.clip_metrics(clip.frames, clip.caption, model, tokenizer=tokenizer)
    assert M.clip_metrics(clip.frames, clip.caption, model, processor) == direct
    with pytest.raises(ValueError, match="tokenizer"):
        M.clip_metrics(clip.frames, clip.caption, model)
