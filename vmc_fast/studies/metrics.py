"""Motion-transfer metrics: object tracks by colour segmentation, motion fidelity, appearance, consistency, CLIP.

The toy world (vmc_fast.toy.world) renders one object on a static background, so simple segmentation recovers
the object's track from any video, generated or not: by its known colour (`object_track`), or, when the colour is
unknown, as the pixels that differ most from the frame's median colour (`salient_track`). Motion fidelity then
compares tracks by their frame-to-frame displacements, independent of where the object is.

Frames everywhere are (3, F, H, W) float tensors in [-1, 1]; tracks are (F, 2) (x, y) in pixel coordinates
with pixel (row i, column j) centred at (x=j, y=i), NaN where the object was not found.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from vmc_fast.toy.world import (
    AREA_FRACTION,
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    Clip,
    background_image,
    shape_coverage,
)

# --------------------------------------------------------------------------------------------------------------
# Segmentation and tracks
# --------------------------------------------------------------------------------------------------------------


class TrackEstimate(NamedTuple):
    """An object track recovered from frames."""

    xy: torch.Tensor
    """(F, 2) float64 centroid (x, y) in pixels, NaN where not found."""
    found: torch.Tensor
    """(F,) bool: the object was found in that frame."""
    area: torch.Tensor
    """(F,) float64 mask mass in pixels (0 where not found)."""


def _unit(frames: torch.Tensor) -> torch.Tensor:
    """(3, F, H, W) in [-1, 1] -> float64 in [0, 1]."""
    if frames.dim() != 4 or frames.shape[0] != 3:
        raise ValueError(f"frames must be (3, F, H, W), got shape {tuple(frames.shape)}")
    return ((frames.detach().double() + 1) / 2).clamp(0, 1)


def _rgb(colour: str | tuple[float, float, float] | torch.Tensor) -> torch.Tensor:
    """A colour name or RGB triple in [0, 1] -> (3,) float64."""
    if isinstance(colour, str):
        if colour not in COLOURS:
            raise ValueError(f"colour must be one of {sorted(COLOURS)} or an RGB triple, got {colour!r}")
        colour = COLOURS[colour]
    return torch.as_tensor(colour, dtype=torch.float64).reshape(3)


def colour_mask(frames: torch.Tensor, colour, tol: float = 0.3) -> torch.Tensor:
    """Soft mask of pixels near a colour: (F, H, W) float64, 1 at the exact colour, 0 beyond RGB distance `tol`.

    The weight falls linearly with distance, so anti-aliased edges count in proportion to their coverage and the
    centroid of a symmetric shape stays at its centre.
    """
    dist = (_unit(frames) - _rgb(colour).view(3, 1, 1, 1)).norm(dim=0)
    return (1 - dist / tol).clamp(min=0)


def background_distance(frames: torch.Tensor) -> torch.Tensor:
    """(F, H, W) float64: RGB distance of every pixel from its frame's median colour (the background estimate)."""
    unit = _unit(frames)
    median = unit.flatten(2).median(dim=2).values  # (3, F)
    return (unit - median[:, :, None, None]).norm(dim=0)


def salient_mask(frames: torch.Tensor, min_distance: float = 0.3, relative: float = 0.5) -> torch.Tensor:
    """Colour-agnostic object mask: (F, H, W) float64 in [0, 1].

    A pixel belongs to the object when its distance from the frame's median colour exceeds both `min_distance`
    and `relative` times the frame's largest distance; its weight is that distance over the largest one.
    """
    dist = background_distance(frames)
    peak = dist.flatten(1).amax(1).view(-1, 1, 1)
    threshold = torch.clamp(relative * peak, min=min_distance)
    return torch.where(dist > threshold, dist / peak.clamp(min=1e-12), torch.zeros_like(dist))


def mask_centroid(mask: torch.Tensor, min_area: float = 1.0) -> TrackEstimate:
    """Centroid of a (F, H, W) soft mask per frame; frames with less than `min_area` pixels of mass are NaN."""
    mask = mask.double()
    num_frames, height, width = mask.shape
    area = mask.sum((1, 2))
    xs = torch.arange(width, dtype=torch.float64).view(1, 1, width)
    ys = torch.arange(height, dtype=torch.float64).view(1, height, 1)
    found = area >= min_area
    safe = area.clamp(min=1e-12)
    xy = torch.stack([(mask * xs).sum((1, 2)) / safe, (mask * ys).sum((1, 2)) / safe], dim=1)
    xy[~found] = math.nan
    return TrackEstimate(xy=xy, found=found, area=torch.where(found, area, torch.zeros_like(area)))


def object_track(frames: torch.Tensor, colour=None, tol: float = 0.3) -> TrackEstimate:
    """Track the object of a known colour (name or RGB in [0, 1]); colour None falls back to `salient_track`."""
    if colour is None:
        return salient_track(frames)
    return mask_centroid(colour_mask(frames, colour, tol))


def salient_track(frames: torch.Tensor) -> TrackEstimate:
    """Track the object of unknown colour: the centroid of the pixels most unlike the frame's median colour."""
    return mask_centroid(salient_mask(frames))


def size_from_area(area: torch.Tensor, shape: str | None = None) -> torch.Tensor:
    """Object size (bounding-box width, pixels) from mask area; without a shape, sqrt(area)."""
    fraction = AREA_FRACTION[shape] if shape is not None else 1.0
    return torch.sqrt(area.double() / fraction)


# --------------------------------------------------------------------------------------------------------------
# Motion fidelity
# --------------------------------------------------------------------------------------------------------------


@dataclass
class MotionScores:
    """How well one track's motion copies another's."""

    cosine: float
    """Mean cosine between generated and reference frame-to-frame displacements, in [-1, 1]."""
    l2_error: float
    """RMS distance of the mean-centred tracks over the RMS spread of the reference (0 is perfect)."""
    coverage: float
    """Fraction of frames where both tracks are defined."""
    fidelity: float
    """sqrt((cosine + 1) / 2 * clamp(1 - l2_error / 2, 0, 1)) * coverage, in [0, 1]; 1 for a perfect copy."""


def _motion_vectors(track: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """(F, 2) track and optional (F,) size -> (F, 2 or 3) float64."""
    track = torch.as_tensor(track, dtype=torch.float64)
    if track.dim() != 2 or track.shape[1] != 2:
        raise ValueError(f"track must be (F, 2), got shape {tuple(track.shape)}")
    if scale is None:
        return track
    return torch.cat([track, torch.as_tensor(scale, dtype=torch.float64).reshape(-1, 1)], dim=1)


def _displacement_cosine(d_gen: torch.Tensor, d_ref: torch.Tensor) -> float:
    """Mean cosine of (S, D) displacements over the steps where the reference moves."""
    ref_norm, gen_norm = d_ref.norm(dim=1), d_gen.norm(dim=1)
    moving = ref_norm > 1e-3 * ref_norm.max() + 1e-9
    if not moving.any():  # a still reference: a still copy is perfect
        return 1.0 if bool((gen_norm < 1e-6).all()) else 0.0
    cos = (d_gen * d_ref).sum(1)[moving] / (ref_norm[moving] * gen_norm[moving]).clamp(min=1e-12)
    return float(cos.clamp(-1, 1).mean())


def _centred_error(gen: torch.Tensor, ref: torch.Tensor) -> float:
    """RMS distance between the mean-centred (N, D) tracks, relative to the reference's RMS spread."""
    gen_c, ref_c = gen - gen.mean(0), ref - ref.mean(0)
    spread = ref_c.pow(2).sum(1).mean().sqrt()
    error = (gen_c - ref_c).pow(2).sum(1).mean().sqrt()
    if spread < 1e-9:
        return 0.0 if error < 1e-6 else math.inf
    return float(error / spread)


def motion_scores(track_gen, track_ref, scale_gen=None, scale_ref=None) -> MotionScores:
    """Compare motions, not positions: tracks (F, 2) in the same pixel units, optional sizes (F,) for zooms.

    Only frames where both tracks are finite take part; coverage scales the final score down for the rest.
    """
    if (scale_gen is None) != (scale_ref is None):
        raise ValueError("scale_gen and scale_ref must be given together")
    gen, ref = _motion_vectors(track_gen, scale_gen), _motion_vectors(track_ref, scale_ref)
    if gen.shape != ref.shape:
        raise ValueError(f"track_gen {tuple(gen.shape)} and track_ref {tuple(ref.shape)} must have equal shapes")
    valid = torch.isfinite(gen).all(1) & torch.isfinite(ref).all(1)
    steps = valid[1:] & valid[:-1]
    coverage = float(valid.double().mean())
    if not steps.any():
        return MotionScores(cosine=0.0, l2_error=math.inf, coverage=coverage, fidelity=0.0)
    cosine = _displacement_cosine(gen.diff(dim=0)[steps], ref.diff(dim=0)[steps])
    l2_error = _centred_error(gen[valid], ref[valid])
    fidelity = math.sqrt((cosine + 1) / 2 * min(max(1 - l2_error / 2, 0.0), 1.0)) * coverage
    return MotionScores(cosine=cosine, l2_error=l2_error, coverage=coverage, fidelity=fidelity)


def motion_fidelity(track_gen, track_ref, scale_gen=None, scale_ref=None) -> float:
    """Motion fidelity in [0, 1]: 1 for a perfect copy, near 0 for a reversed motion. See `motion_scores`."""
    return motion_scores(track_gen, track_ref, scale_gen, scale_ref).fidelity


# --------------------------------------------------------------------------------------------------------------
# Appearance and temporal consistency
# --------------------------------------------------------------------------------------------------------------


@dataclass
class AppearanceScores:
    """How well the object in a video shows the asked colour and shape."""

    colour: float
    """Fraction of frames whose dominant foreground colour (nearest named colour) is the asked one."""
    shape: float
    """Fraction of frames whose best-fitting shape template is the asked shape (nan when no shape was asked)."""
    shape_iou: float
    """Mean IoU between the foreground and a template of the asked shape fitted to it (nan without a shape)."""
    fill_ratio: float
    """Mean foreground area over bounding-box area (compare with world.FILL_RATIO)."""


def dominant_colour(frames: torch.Tensor, mask: torch.Tensor) -> list[str | None]:
    """Per frame, the named colour most foreground pixels are nearest to (mask-weighted); None without foreground."""
    names = list(COLOURS)
    palette = torch.tensor([COLOURS[n] for n in names], dtype=torch.float64)  # (K, 3)
    pixels = _unit(frames).permute(1, 2, 3, 0).reshape(mask.shape[0], -1, 3)  # (F, HW, 3)
    nearest = torch.cdist(pixels, palette[None].expand(mask.shape[0], -1, -1)).argmin(-1)  # (F, HW)
    result = []
    for labels, weights in zip(nearest, mask.flatten(1).double()):
        votes = torch.bincount(labels, weights=weights, minlength=len(names))
        result.append(names[int(votes.argmax())] if votes.sum() > 0 else None)
    return result


def shape_template_iou(binary: torch.Tensor) -> dict[str, torch.Tensor]:
    """IoU of (N, H, W) bool masks with each shape's template placed at the mask's centroid with the mask's area.

    Returns {shape: (N,) float64}; the best-scoring shape is the mask's nearest named shape.
    """
    est = mask_centroid(binary.double())
    height, width = binary.shape[1:]
    ious = {}
    for name in SHAPES:
        size = size_from_area(est.area, name)
        template = shape_coverage(name, height, width, est.xy[:, 0], est.xy[:, 1], size, supersample=1) >= 0.5
        union = (template | binary).sum((1, 2)).clamp(min=1)
        ious[name] = (template & binary).sum((1, 2)).double() / union
    return ious


def _fill_ratio(binary: torch.Tensor) -> float:
    rows, cols = binary.any(1).nonzero(), binary.any(0).nonzero()
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    return float(binary.sum() / box)


def appearance_adherence(frames: torch.Tensor, colour: str, shape: str | None = None) -> AppearanceScores:
    """Colour and shape adherence of the salient object in (3, F, H, W) frames in [-1, 1]."""
    if shape is not None and shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    mask = salient_mask(frames)
    colours = dominant_colour(frames, mask)
    colour_score = sum(c == colour for c in colours) / len(colours)
    binaries = [m > 0 for m in mask if (m > 0).sum() >= 3]
    if not binaries:
        return AppearanceScores(colour=colour_score, shape=0.0 if shape else math.nan,
                                shape_iou=0.0 if shape else math.nan, fill_ratio=math.nan)
    fill = sum(_fill_ratio(b) for b in binaries) / len(binaries)
    if shape is None:
        return AppearanceScores(colour=colour_score, shape=math.nan, shape_iou=math.nan, fill_ratio=fill)
    ious = shape_template_iou(torch.stack(binaries))
    best = torch.stack([ious[name] for name in SHAPES]).argmax(0)  # (N,)
    num_frames = mask.shape[0]
    return AppearanceScores(colour=colour_score, shape=float((best == SHAPES.index(shape)).sum()) / num_frames,
                            shape_iou=float(ious[shape].sum()) / num_frames, fill_ratio=fill)


BACKGROUND_KEEP = 0.75
"""Fraction of pixels each background template is judged on: the best-fitting ones, so the object (about a tenth
of the picture) does not decide which background a frame shows."""


def background_adherence(frames: torch.Tensor, background: str) -> float:
    """Fraction of frames whose background is, of the toy world's backgrounds, nearest the asked one.

    frames: (3, F, H, W) float in [-1, 1]. Each background template (`world.background_image`) is compared with a
    frame by the mean absolute error over its best-fitting BACKGROUND_KEEP of the pixels (a trimmed mean), so the
    object in front does not count. Raises ValueError for an unknown background.
    """
    if background not in BACKGROUNDS:
        raise ValueError(f"background must be one of {BACKGROUNDS}, got {background!r}")
    unit = _unit(frames)  # (3, F, H, W) in [0, 1]
    height, width = unit.shape[-2:]
    errors = []
    for name in BACKGROUNDS:
        template = background_image(name, height, width).to(unit)[:, None]  # (3, 1, H, W)
        per_pixel = (unit - template).abs().mean(0).flatten(1)  # (F, HW)
        kept = max(1, int(BACKGROUND_KEEP * per_pixel.shape[1]))
        errors.append(per_pixel.sort(dim=1).values[:, :kept].mean(1))
    nearest = torch.stack(errors).argmin(0)  # (F,)
    return float((nearest == BACKGROUNDS.index(background)).double().mean())


def temporal_consistency(frames: torch.Tensor) -> float:
    """Mean cosine similarity of consecutive frames' pixel vectors (values in [0, 1]); 1 for a still video."""
    unit = _unit(frames).permute(1, 0, 2, 3).flatten(1)  # (F, 3HW)
    if unit.shape[0] < 2:
        return 1.0
    return float(F.cosine_similarity(unit[1:], unit[:-1], dim=1, eps=1e-12).mean())


@dataclass
class ObjectStability:
    """How steady the salient object stays over a video."""

    found: float
    """Fraction of frames where an object was found."""
    area_variation: float
    """Standard deviation of the object's area over its mean (0 for a constant size)."""
    colour_drift: float
    """Mean RGB distance of each frame's mean object colour from their median (0 for a constant colour)."""


def object_stability(frames: torch.Tensor) -> ObjectStability:
    """Stability of the salient object's area and colour across (3, F, H, W) frames in [-1, 1]."""
    mask = salient_mask(frames)
    est = mask_centroid(mask)
    if int(est.found.sum()) == 0:
        return ObjectStability(found=0.0, area_variation=math.inf, colour_drift=math.inf)
    area = est.area[est.found]
    weights = mask[est.found].flatten(1)  # (N, HW)
    pixels = _unit(frames)[:, est.found].flatten(2)  # (3, N, HW)
    mean_colour = (pixels * weights).sum(2) / weights.sum(1)  # (3, N)
    drift = (mean_colour - mean_colour.median(dim=1, keepdim=True).values).norm(dim=0).mean()
    variation = area.std(unbiased=False) / area.mean()
    return ObjectStability(found=float(est.found.double().mean()), area_variation=float(variation),
                           colour_drift=float(drift))


# --------------------------------------------------------------------------------------------------------------
# One report for a generated video against a toy reference clip
# --------------------------------------------------------------------------------------------------------------


def motion_transfer_report(frames: torch.Tensor, reference: Clip, colour: str | None = None,
                           shape: str | None = None) -> dict[str, float]:
    """Score generated frames (3, F, H, W) in [-1, 1] against the toy clip whose motion they should copy.

    The generated track comes from the asked colour when given (else from saliency) and is rescaled to the
    reference's pixel units; sizes take part only for references whose size changes (the zoom families).
    """
    if frames.shape[1] != reference.frames.shape[1]:
        raise ValueError(f"frames has {frames.shape[1]} frames, the reference {reference.frames.shape[1]}")
    est = object_track(frames, colour)
    ratio = torch.tensor([reference.spec.width / frames.shape[3], reference.spec.height / frames.shape[2]])
    track_gen = (est.xy + 0.5) * ratio.double() - 0.5
    scales = None
    if float(reference.scale.max() - reference.scale.min()) > 1e-3 * float(reference.scale.max()):
        size_gen = size_from_area(est.area, shape or reference.spec.shape) * math.sqrt(ratio.prod())
        scales = (torch.where(est.found, size_gen, torch.full_like(size_gen, math.nan)), reference.scale)
    scores = motion_scores(track_gen, reference.track, *(scales or (None, None)))
    report = {"motion_fidelity": scores.fidelity, "motion_cosine": scores.cosine,
              "motion_l2_error": scores.l2_error, "found": scores.coverage,
              "temporal_consistency": temporal_consistency(frames)}
    if colour is not None:
        appearance = appearance_adherence(frames, colour, shape)
        report.update(colour_adherence=appearance.colour, shape_adherence=appearance.shape)
    return report


# --------------------------------------------------------------------------------------------------------------
# CLIP metrics (text alignment and frame consistency, as in the VMC paper)
# --------------------------------------------------------------------------------------------------------------

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ClipScores:
    """CLIP scores of one video, raw cosines in [-1, 1] (papers often report them times 100)."""

    text_alignment: float
    """Mean cosine between each frame's image embedding and the prompt's text embedding."""
    frame_consistency: float
    """Mean cosine between consecutive frames' image embeddings."""


def clip_pixel_values(frames: torch.Tensor, image_size: int, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """(3, F, H, W) in [-1, 1] -> CLIP input (F, 3, S, S) float32: shorter side to S, centre crop, normalised."""
    images = _unit(frames).float().permute(1, 0, 2, 3)  # (F, 3, H, W)
    height, width = images.shape[-2:]
    factor = image_size / min(height, width)
    new_h, new_w = max(image_size, round(height * factor)), max(image_size, round(width * factor))
    images = F.interpolate(images, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
    top, left = (new_h - image_size) // 2, (new_w - image_size) // 2
    images = images[:, :, top:top + image_size, left:left + image_size].clamp(0, 1)
    mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return (images - mean_t) / std_t


def _features(output) -> torch.Tensor:
    """CLIPModel.get_*_features returns a tensor in older transformers and an output with pooler_output in newer."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _tokenizer_of(processor, tokenizer):
    if tokenizer is not None:
        return tokenizer
    if processor is None:
        raise ValueError("clip_metrics needs a processor or a tokenizer to encode the prompt")
    return getattr(processor, "tokenizer", processor)


def _normalisation_of(processor) -> tuple[tuple, tuple]:
    image_processor = getattr(processor, "image_processor", None)
    mean = getattr(image_processor, "image_mean", None) or CLIP_MEAN
    std = getattr(image_processor, "image_std", None) or CLIP_STD
    return tuple(mean), tuple(std)


@torch.no_grad()
def clip_metrics(frames: torch.Tensor, prompt: str, model, processor=None, tokenizer=None) -> ClipScores:
    """CLIP text alignment and frame consistency of (3, F, H, W) frames in [-1, 1] for a transformers CLIPModel.

    Pixels are resized and normalised here with torch (mean/std from the processor's image processor when it has
    one), so only a tokenizer is strictly needed: `tokenizer`, or `processor.tokenizer`.
    """
    param = next(model.parameters())
    mean, std = _normalisation_of(processor)
    pixels = clip_pixel_values(frames, model.config.vision_config.image_size, mean, std)
    image = _features(model.get_image_features(pixel_values=pixels.to(param.device, param.dtype)))
    tokens = _tokenizer_of(processor, tokenizer)(
        [prompt], padding=True, truncation=True, return_tensors="pt",
        max_length=model.config.text_config.max_position_embeddings)
    text = _features(model.get_text_features(input_ids=tokens["input_ids"].to(param.device),
                                             attention_mask=tokens["attention_mask"].to(param.device)))
    image, text = F.normalize(image.double(), dim=-1), F.normalize(text.double(), dim=-1)
    alignment = (image @ text[0]).mean()
    consistency = (image[1:] * image[:-1]).sum(-1).mean() if image.shape[0] > 1 else torch.tensor(1.0)
    return ClipScores(text_alignment=float(alignment.clamp(-1, 1)),
                      frame_consistency=float(consistency.clamp(-1, 1)))


def load_clip(name_or_path: str = "openai/clip-vit-base-patch32"):
    """(CLIPModel, CLIPProcessor) from a hub id or a local folder, in eval mode."""
    from transformers import CLIPModel, CLIPProcessor

    return CLIPModel.from_pretrained(name_or_path).eval(), CLIPProcessor.from_pretrained(name_or_path)


def tiny_random_clip(seed: int = 0, image_size: int = 32):
    """A tiny randomly initialised CLIPModel and a word-level tokenizer over the toy world's words, no downloads.

    Returns (model, tokenizer); for tests and smoke runs of clip_metrics.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

    from vmc_fast.toy import world

    special = ["<pad>", "<unk>", "<bos>", "<eos>"]
    words = " ".join([*COLOURS, *SHAPES, *world.MOTION_PHRASES.values(), *world.BACKGROUND_PHRASES.values(),
                      "on background moving dark"]).replace("-", " ").split()
    vocab = {token: i for i, token in enumerate(dict.fromkeys(special + words))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                        bos_token="<bos>", eos_token="<eos>", model_max_length=32)
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=32, pad_token_id=vocab["<pad>"],
                bos_token_id=vocab["<bos>"], eos_token_id=vocab["<eos>"])
    vision = dict(image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=2)
    with torch.random.fork_rng():  # leave the caller's random stream alone
        torch.manual_seed(seed)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    return model, tokenizer
