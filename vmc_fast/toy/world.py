"""A toy world with known motion: procedural clips of one object on a background, with exact ground truth.

Every clip is one shape of one colour moving along a parametrised path over a static background. The renderer
returns the frames together with the object's exact centre and size in every frame, and two captions: a full one
("a red circle moving in a zigzag on a grey background") and an appearance-invariant motion caption ("a circle
moving in a zigzag") of the kind VMC trains on. Held-out motion families let an evaluation ask whether a motion
learnt from one clip transfers to new appearances.

Coordinates. Normalised coordinates run over [0, 1] on each axis. Pixel coordinates put the centre of pixel
(row i, column j) at (x=j, y=i), so normalised u maps to pixel u * W - 0.5; y grows downwards ("up" is -y).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from vmc_fast.io.video import write_video

# --------------------------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------------------------

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.8, 0.15),
    "blue": (0.15, 0.35, 1.0),
    "yellow": (0.95, 0.9, 0.1),
    "magenta": (0.9, 0.1, 0.9),
    "cyan": (0.1, 0.9, 0.9),
    "white": (1.0, 1.0, 1.0),
    "orange": (1.0, 0.55, 0.0),
}
"""Object colours by name, RGB in [0, 1]."""

# No hexagon or other near-circles: at 32 px they are indistinguishable from a circle, which would blur the
# shape-adherence metric.
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")

# Area of each shape divided by size**2, where size is the shape's bounding-box width in pixels.
AREA_FRACTION: dict[str, float] = {
    "circle": math.pi / 4,
    "square": 1.0,
    "triangle": math.sqrt(3) / 4,
    "diamond": 0.5,
    "cross": 0.4375,
    "ring": math.pi * 0.75 / 4,
}

# Half-width, extent above and extent below the centre, as fractions of size (the triangle's centre is its
# centroid, which sits a third of the way up from its base).
SHAPE_EXTENT: dict[str, tuple[float, float, float]] = {
    **{name: (0.5, 0.5, 0.5) for name in ("circle", "square", "diamond", "cross", "ring")},
    "triangle": (0.5, 1 / math.sqrt(3), 0.5 / math.sqrt(3)),
}

# Area divided by bounding-box area: a cheap shape descriptor for segmented masks.
FILL_RATIO: dict[str, float] = {
    name: AREA_FRACTION[name] / (2 * SHAPE_EXTENT[name][0] * (SHAPE_EXTENT[name][1] + SHAPE_EXTENT[name][2]))
    for name in SHAPES
}

PLAIN_BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "grey": (0.5, 0.5, 0.5),
    "black": (0.0, 0.0, 0.0),
    "dark-blue": (0.05, 0.07, 0.3),
}
BACKGROUNDS = (*PLAIN_BACKGROUNDS, "stripes", "checker", "noise")
BACKGROUND_PHRASES = {
    "grey": "a grey",
    "black": "a black",
    "dark-blue": "a dark blue",
    "stripes": "a striped",
    "checker": "a checkered",
    "noise": "a noisy",
}
NOISE_SEED = 1234
"""The noise background is the same texture in every clip."""

# --------------------------------------------------------------------------------------------------------------
# Motion families: normalised time s in [0, 1] -> (x, y, scale factor), x and y normalised
# --------------------------------------------------------------------------------------------------------------


@dataclass
class MotionParams:
    """The small parameters of one motion path; what each means depends on the family."""

    center_x: float = 0.5
    """Path centre, normalised x in [0, 1]."""
    center_y: float = 0.5
    """Path centre, normalised y in [0, 1]."""
    amplitude: float = 0.25
    """Path size in normalised units (travel for straight moves, radius for orbits, log-range for zooms)."""
    phase: float = 0.0
    """Starting angle in radians for the periodic families."""
    direction: int = 1
    """+1 or -1: turning sense of orbit/spiral/figure-eight, travel side of zigzag and ping-pong."""
    num_cycles: float = 1.0
    """Number of periods: bounces, back-and-forths, zigzag up-down pairs, spiral turns."""
    size: float = 0.3
    """Object size (bounding-box width) as a fraction of min(height, width)."""

    def __post_init__(self) -> None:
        if self.direction not in (1, -1):
            raise ValueError(f"direction must be +1 or -1, got {self.direction}")
        if self.size <= 0:
            raise ValueError(f"size must be positive, got {self.size}")
        if self.num_cycles <= 0:
            raise ValueError(f"num_cycles must be positive, got {self.num_cycles}")


Path3 = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _const(s: torch.Tensor, value: float) -> torch.Tensor:
    return torch.full_like(s, value)


def _triangle_wave(u: torch.Tensor) -> torch.Tensor:
    """Period-1 triangle wave: -1 at integers, +1 at half-integers."""
    return 1 - 4 * (u - torch.floor(u) - 0.5).abs()


def _straight(dx: float, dy: float) -> Callable[[torch.Tensor, MotionParams], Path3]:
    """A straight move through the centre; (dx, dy) is the unit direction in image coordinates."""

    def path(s: torch.Tensor, p: MotionParams) -> Path3:
        x = p.center_x + dx * p.amplitude * (s - 0.5)
        y = p.center_y + dy * p.amplitude * (s - 0.5)
        return x, y, _const(s, 1.0)

    return path


def _orbit(s: torch.Tensor, p: MotionParams) -> Path3:
    angle = p.phase + p.direction * 2 * math.pi * s
    x = p.center_x + p.amplitude * torch.cos(angle)
    y = p.center_y + p.amplitude * torch.sin(angle)
    return x, y, _const(s, 1.0)


def _bounce(s: torch.Tensor, p: MotionParams) -> Path3:
    """A ball under gravity: parabolic hops of height `amplitude` landing on a floor below the centre."""
    u = p.num_cycles * s
    t = u - torch.floor(u)
    y = p.center_y + p.amplitude / 2 - p.amplitude * 4 * t * (1 - t)
    return _const(s, p.center_x), y, _const(s, 1.0)


def _pingpong(s: torch.Tensor, p: MotionParams) -> Path3:
    x = p.center_x + p.direction * p.amplitude / 2 * _triangle_wave(p.num_cycles * s)
    return x, _const(s, p.center_y), _const(s, 1.0)


def _zoom(sign: int) -> Callable[[torch.Tensor, MotionParams], Path3]:
    def path(s: torch.Tensor, p: MotionParams) -> Path3:
        scale = torch.exp(sign * p.amplitude * (2 * s - 1))
        return _const(s, p.center_x), _const(s, p.center_y), scale

    return path


def _zigzag(s: torch.Tensor, p: MotionParams) -> Path3:
    """Travel sideways while going up and down in straight legs; 2 * num_cycles legs in all."""
    x = p.center_x + p.direction * p.amplitude * (s - 0.5)
    y = p.center_y - 0.3 * p.amplitude * _triangle_wave(p.num_cycles * s)
    return x, y, _const(s, 1.0)


def _figure_eight(s: torch.Tensor, p: MotionParams) -> Path3:
    angle = p.phase + p.direction * 2 * math.pi * s
    x = p.center_x + p.amplitude * torch.sin(angle)
    y = p.center_y + 0.5 * p.amplitude * torch.sin(2 * angle)
    return x, y, _const(s, 1.0)


def _spiral(s: torch.Tensor, p: MotionParams) -> Path3:
    """Outward spiral: the radius grows from a quarter of `amplitude` to `amplitude` over num_cycles turns."""
    angle = p.phase + p.direction * 2 * math.pi * p.num_cycles * s
    radius = p.amplitude * (0.25 + 0.75 * s)
    return p.center_x + radius * torch.cos(angle), p.center_y + radius * torch.sin(angle), _const(s, 1.0)


_D = 1 / math.sqrt(2)
MOTION_FAMILIES: dict[str, Callable[[torch.Tensor, MotionParams], Path3]] = {
    "left": _straight(-1, 0),
    "right": _straight(1, 0),
    "up": _straight(0, -1),
    "down": _straight(0, 1),
    "up-left": _straight(-_D, -_D),
    "up-right": _straight(_D, -_D),
    "down-left": _straight(-_D, _D),
    "down-right": _straight(_D, _D),
    "orbit": _orbit,
    "bounce": _bounce,
    "pingpong": _pingpong,
    "zoom-in": _zoom(1),
    "zoom-out": _zoom(-1),
    "zigzag": _zigzag,
    "figure-eight": _figure_eight,
    "spiral": _spiral,
}
"""Motion family name -> path(s (F,) float64, params) -> (x, y, scale factor), each (F,) float64."""

MOTION_PHRASES: dict[str, str] = {
    "left": "moving left",
    "right": "moving right",
    "up": "moving up",
    "down": "moving down",
    "up-left": "moving diagonally up and to the left",
    "up-right": "moving diagonally up and to the right",
    "down-left": "moving diagonally down and to the left",
    "down-right": "moving diagonally down and to the right",
    "orbit": "moving in a circle",
    "bounce": "bouncing up and down",
    "pingpong": "moving back and forth",
    "zoom-in": "growing larger",
    "zoom-out": "shrinking",
    "zigzag": "moving in a zigzag",
    "figure-eight": "moving in a figure eight",
    "spiral": "moving in a spiral",
}

HELD_OUT_MOTIONS = ("zigzag", "figure-eight", "spiral")
TRAIN_MOTIONS = tuple(name for name in MOTION_FAMILIES if name not in HELD_OUT_MOTIONS)


def _zigzag_cycles(rng: random.Random, num_frames: int) -> float:
    """Pick a leg count that divides the frame steps, so that every corner of the zigzag lands on a frame."""
    num_steps = num_frames - 1
    legs = [n for n in range(3, min(num_steps, 8) + 1) if num_steps % n == 0]
    return rng.choice(legs or [max(num_steps, 2)]) / 2


def sample_motion_params(motion: str, rng: random.Random, num_frames: int = 8) -> MotionParams:
    """Draw small path parameters for one family; every sampled path keeps the object inside the image."""
    if motion not in MOTION_FAMILIES:
        raise ValueError(f"motion must be one of {sorted(MOTION_FAMILIES)}, got {motion!r}")
    p = MotionParams(
        center_x=0.5 + rng.uniform(-0.04, 0.04),
        center_y=0.5 + rng.uniform(-0.04, 0.04),
        phase=rng.uniform(0, 2 * math.pi),
        direction=rng.choice((1, -1)),
        size=rng.uniform(0.26, 0.34),
    )
    if motion in ("left", "right", "up", "down", "up-left", "up-right", "down-left", "down-right", "zigzag"):
        p.amplitude = rng.uniform(0.36, 0.5)
    elif motion in ("orbit", "figure-eight", "spiral"):
        p.amplitude = rng.uniform(0.18, 0.26)
    elif motion in ("bounce", "pingpong"):
        p.amplitude = rng.uniform(0.35, 0.45)
    else:  # zooms: amplitude is half the log size range
        p.amplitude = rng.uniform(0.4, 0.5)
    p.num_cycles = {
        "bounce": float(rng.choice((1, 2))),
        "pingpong": rng.choice((1.0, 1.5)),
        "spiral": rng.uniform(1.0, 1.4),
        "zigzag": _zigzag_cycles(rng, num_frames),
    }.get(motion, 1.0)
    return p


# --------------------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------------------


def _box_sdf(x: torch.Tensor, y: torch.Tensor, half_w: torch.Tensor, half_h: torch.Tensor) -> torch.Tensor:
    qx, qy = x.abs() - half_w, y.abs() - half_h
    outside = torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2)
    return outside + torch.maximum(qx, qy).clamp(max=0)


def _polygon_sdf(x: torch.Tensor, y: torch.Tensor, angles_deg: tuple[float, ...], inradius: torch.Tensor):
    """Regular polygon as the intersection of half-planes with outward normals at the given angles.

    Not the exact distance outside near corners, but exact on the boundary and symmetric like the polygon.
    """
    dists = [x * math.cos(math.radians(a)) + y * math.sin(math.radians(a)) for a in angles_deg]
    return torch.stack(dists).amax(0) - inradius


def shape_sdf(shape: str, x: torch.Tensor, y: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """Signed distance (pixels, negative inside) of points (x, y) relative to the centre, for a shape of `size`.

    All arguments broadcast together (float64). Distances are exact near the boundary, which is all that the
    anti-aliasing needs.
    """
    r = size / 2
    if shape == "circle":
        return torch.sqrt(x**2 + y**2) - r
    if shape == "square":
        return _box_sdf(x, y, r, r)
    if shape == "diamond":
        return (x.abs() + y.abs() - r) / math.sqrt(2)
    if shape == "cross":
        return torch.minimum(_box_sdf(x, y, r, r / 4), _box_sdf(x, y, r / 4, r))
    if shape == "ring":
        return (torch.sqrt(x**2 + y**2) - 0.75 * r).abs() - 0.25 * r
    if shape == "triangle":  # pointing up (-y), centroid at the origin
        return _polygon_sdf(x, y, (90.0, 210.0, 330.0), size / (2 * math.sqrt(3)))
    raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")


def shape_coverage(
    shape: str,
    height: int,
    width: int,
    cx: torch.Tensor,
    cy: torch.Tensor,
    size: torch.Tensor,
    supersample: int = 4,
) -> torch.Tensor:
    """Anti-aliased coverage of a shape: (F, H, W) float32 in [0, 1] for centres cx, cy and sizes, each (F,).

    Each pixel averages supersample**2 sub-samples, each with a one-sub-pixel linear edge ramp, so the coverage
    centroid of a symmetric shape sits at its centre to within a few hundredths of a pixel.
    """
    offsets = (torch.arange(supersample, dtype=torch.float64) + 0.5) / supersample - 0.5
    xs = (torch.arange(width, dtype=torch.float64)[:, None] + offsets).reshape(-1)
    ys = (torch.arange(height, dtype=torch.float64)[:, None] + offsets).reshape(-1)
    cx, cy, size = (torch.as_tensor(v, dtype=torch.float64).reshape(-1, 1, 1) for v in (cx, cy, size))
    dist = shape_sdf(shape, xs[None, None, :] - cx, ys[None, :, None] - cy, size)
    sub = (0.5 - dist * supersample).clamp(0, 1)
    return F.avg_pool2d(sub[:, None], supersample)[:, 0].float()


def background_image(name: str, height: int, width: int) -> torch.Tensor:
    """A static background: (3, H, W) float32 in [0, 1]. Patterns scale with the image so any size works."""
    if name in PLAIN_BACKGROUNDS:
        return torch.tensor(PLAIN_BACKGROUNDS[name]).view(3, 1, 1).expand(3, height, width).clone()
    cell = max(2, min(height, width) // 8)
    rows = torch.arange(height)[:, None] // cell
    cols = torch.arange(width)[None, :] // cell
    if name == "stripes":
        level = 0.3 + 0.15 * (cols % 2).expand(height, width).float()
    elif name == "checker":
        level = 0.25 + 0.15 * ((rows + cols) % 2).float()
    elif name == "noise":
        gen = torch.Generator().manual_seed(NOISE_SEED)
        coarse = torch.rand(1, 1, height // cell + 2, width // cell + 2, generator=gen)
        fine = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)[0, 0]
        level = 0.3 + 0.2 * (fine - 0.5)
    else:
        raise ValueError(f"background must be one of {BACKGROUNDS}, got {name!r}")
    return level.float()[None].expand(3, height, width).clone()


@dataclass
class ClipSpec:
    """Everything that determines one toy clip; render_clip(spec) is a pure function of it."""

    shape: str = "circle"
    """Object shape, one of SHAPES."""
    colour: str = "red"
    """Object colour, a key of COLOURS."""
    background: str = "grey"
    """Background, one of BACKGROUNDS (plain colours or stripes/checker/noise patterns)."""
    motion: str = "right"
    """Motion family, a key of MOTION_FAMILIES."""
    num_frames: int = 8
    """Frames in the clip; frame k is at normalised time k / (num_frames - 1)."""
    height: int = 32
    """Frame height in pixels."""
    width: int = 48
    """Frame width in pixels."""
    seed: int = 0
    """Seeds the motion parameters when motion_params is None."""
    motion_params: MotionParams | None = None
    """Explicit path parameters; None samples them from `seed`."""

    def __post_init__(self) -> None:
        if isinstance(self.motion_params, dict):
            self.motion_params = MotionParams(**self.motion_params)
        for name, allowed in (("shape", SHAPES), ("colour", COLOURS), ("background", BACKGROUNDS),
                              ("motion", MOTION_FAMILIES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {sorted(allowed)}, got {getattr(self, name)!r}")
        if self.num_frames < 2:
            raise ValueError(f"num_frames must be at least 2, got {self.num_frames}")
        if self.height < 4 or self.width < 4:
            raise ValueError(f"height and width must be at least 4, got {self.height}x{self.width}")

    def resolved_params(self) -> MotionParams:
        """The explicit motion_params, or the ones that `seed` draws."""
        if self.motion_params is not None:
            return self.motion_params
        return sample_motion_params(self.motion, random.Random(self.seed), self.num_frames)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ClipSpec":
        return cls(**data)


@dataclass
class Clip:
    """A rendered clip and its ground truth."""

    spec: ClipSpec
    """The spec it was rendered from."""
    params: MotionParams
    """The motion parameters actually used."""
    frames: torch.Tensor
    """(3, F, H, W) float32 in [-1, 1]."""
    track: torch.Tensor
    """(F, 2) float32: the object's exact centre (x, y) in pixel coordinates."""
    scale: torch.Tensor
    """(F,) float32: the object's size (bounding-box width) in pixels."""
    mask: torch.Tensor
    """(F, H, W) float32 in [0, 1]: the object's anti-aliased coverage."""
    caption: str = ""
    """Full caption, e.g. 'a red circle moving in a zigzag on a grey background'."""
    motion_caption: str = ""
    """Appearance-invariant caption (object and motion only), e.g. 'a circle moving in a zigzag'."""


def captions(spec: ClipSpec) -> tuple[str, str]:
    """(caption, motion_caption) for a spec."""
    motion = f"a {spec.shape} {MOTION_PHRASES[spec.motion]}"
    full = f"a {spec.colour} {motion[2:]} on {BACKGROUND_PHRASES[spec.background]} background"
    return full, motion


def spec_path(spec: ClipSpec, params: MotionParams) -> tuple[torch.Tensor, torch.Tensor]:
    """The object's centre (F, 2) and size (F,) in pixels, float64, for every frame of a spec."""
    s = torch.linspace(0, 1, spec.num_frames, dtype=torch.float64)
    x, y, scale = MOTION_FAMILIES[spec.motion](s, params)
    track = torch.stack([x * spec.width - 0.5, y * spec.height - 0.5], dim=1)
    return track, params.size * min(spec.height, spec.width) * scale


def render_clip(spec: ClipSpec) -> Clip:
    """Render a spec: frames (3, F, H, W) float32 in [-1, 1] plus exact track, size, mask and captions."""
    params = spec.resolved_params()
    track, size = spec_path(spec, params)
    mask = shape_coverage(spec.shape, spec.height, spec.width, track[:, 0], track[:, 1], size)
    background = background_image(spec.background, spec.height, spec.width)[:, None]
    colour = torch.tensor(COLOURS[spec.colour]).view(3, 1, 1, 1)
    frames = background * (1 - mask[None]) + colour * mask[None]
    caption, motion_caption = captions(spec)
    return Clip(spec=spec, params=params, frames=(frames * 2 - 1).float(), track=track.float(),
                scale=size.float(), mask=mask, caption=caption, motion_caption=motion_caption)


def object_inside(shape: str, track: torch.Tensor, size: torch.Tensor, height: int, width: int,
                  margin: float = 0.0) -> torch.Tensor:
    """(F,) bool: whether the bounding box of a shape at track (F, 2) with size (F,) lies inside the image."""
    half_w, up, down = SHAPE_EXTENT[shape]
    x, y = track[:, 0], track[:, 1]
    # pixel j covers [j - 0.5, j + 0.5]
    return ((x - half_w * size >= margin - 0.5) & (x + half_w * size <= width - 0.5 - margin)
            & (y - up * size >= margin - 0.5) & (y + down * size <= height - 0.5 - margin))


def inside_image(clip: Clip, margin: float = 0.0) -> torch.Tensor:
    """(F,) bool: whether the object lies wholly inside the image (by `margin` pixels) in each frame."""
    return object_inside(clip.spec.shape, clip.track, clip.scale, clip.spec.height, clip.spec.width, margin)


def sample_spec(
    rng: random.Random | int,
    motions: tuple[str, ...] | list[str] = TRAIN_MOTIONS,
    shapes: tuple[str, ...] | list[str] = SHAPES,
    colours: tuple[str, ...] | list[str] = tuple(COLOURS),
    backgrounds: tuple[str, ...] | list[str] = BACKGROUNDS,
    num_frames: int = 8,
    height: int = 32,
    width: int = 48,
) -> ClipSpec:
    """Draw a random spec (with explicit motion parameters) from a seeded `random.Random` or an int seed."""
    rng = random.Random(rng) if isinstance(rng, int) else rng
    motion = rng.choice(list(motions))
    return ClipSpec(
        shape=rng.choice(list(shapes)),
        colour=rng.choice(list(colours)),
        background=rng.choice(list(backgrounds)),
        motion=motion,
        num_frames=num_frames,
        height=height,
        width=width,
        seed=rng.randrange(2**31),
        motion_params=sample_motion_params(motion, rng, num_frames),
    )


# --------------------------------------------------------------------------------------------------------------
# Writing clips
# --------------------------------------------------------------------------------------------------------------


def write_clip(clip: Clip | torch.Tensor, path: str | Path, fps: int = 8) -> Path:
    """Write a clip (or (3, F, H, W) frames in [-1, 1]) as .gif or .mp4, chosen by the path's suffix."""
    return write_video(clip.frames if isinstance(clip, Clip) else clip, path, fps)


def clip_record(clip: Clip) -> dict:
    """A JSON-ready description of a clip: spec, resolved parameters, captions, track and size."""
    return {
        "spec": clip.spec.to_dict(),
        "params": dataclasses.asdict(clip.params),
        "caption": clip.caption,
        "motion_caption": clip.motion_caption,
        "track": [[round(v, 4) for v in xy] for xy in clip.track.tolist()],
        "scale": [round(v, 4) for v in clip.scale.tolist()],
    }


def write_example_folder(
    out_dir: str | Path,
    num_clips: int = 8,
    motions: tuple[str, ...] | list[str] = TRAIN_MOTIONS,
    seed: int = 0,
    suffix: str = ".mp4",
    **spec_kwargs,
) -> list[Path]:
    """Write random clips as NAME.mp4 (or .gif) with sidecars NAME.txt (motion caption) and NAME.json.

    `spec_kwargs` go to sample_spec (shapes, colours, backgrounds, num_frames, height, width).
    Returns the video paths.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for index in range(num_clips):
        clip = render_clip(sample_spec(rng, motions=motions, **spec_kwargs))
        name = f"{index:03d}_{clip.spec.motion}_{clip.spec.colour}_{clip.spec.shape}"
        paths.append(write_clip(clip, out_dir / f"{name}{suffix}"))
        (out_dir / f"{name}.txt").write_text(clip.motion_caption + "\n")
        (out_dir / f"{name}.json").write_text(json.dumps(clip_record(clip), indent=1) + "\n")
    return paths
