"""The built-in example: a procedurally rendered clip, so `vmc-fast train` works with no arguments."""

from __future__ import annotations

from pathlib import Path

from vmc_fast.toyworld import ClipSpec, render_clip, write_clip

DEFAULT_SPEC = ClipSpec(shape="circle", colour="red", background="grey", motion="zigzag", num_frames=8,
                        height=32, width=32, seed=0)


def default_example(folder: Path) -> tuple[str, str]:
    """Render the example clip into `folder` (once) and return (video path, its motion-only prompt)."""
    clip = render_clip(DEFAULT_SPEC)
    path = Path(folder) / "example_zigzag.mp4"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_clip(clip, path)
    return str(path), clip.motion_caption
