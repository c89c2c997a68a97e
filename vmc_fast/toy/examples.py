"""Built-in example clips, rendered procedurally from the toy world, so commands work with no input at all.

- `default_example`: the clip `vmc-fast train` tunes when given no `--videos`.
- The held-out examples: one clip per motion family the toy model never saw in pretraining (zigzag,
  figure-eight, spiral). They ship in ``vmc_fast/toy/assets/examples/`` as NAME.gif (lossless for these flat colours,
  unlike 4:2:0 mp4), NAME.txt (the motion-only prompt) and NAME.json (spec, parameters and exact track), and
  are reproduced by ``python -m vmc_fast.toy.examples``. `vmc-fast demo` and `vmc-fast eval` tune on them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from vmc_fast.errors import VmcError
from vmc_fast.toy.world import (
    HELD_OUT_MOTIONS,
    Clip,
    ClipSpec,
    clip_record,
    render_clip,
    sample_motion_params,
    write_clip,
)

DEFAULT_SPEC = ClipSpec(shape="circle", colour="red", background="grey", motion="zigzag", num_frames=8,
                        height=32, width=32, seed=0)

EXAMPLES_DIR = Path(__file__).resolve().parent / "assets" / "examples"
"""Where the held-out example clips ship inside the package."""
REPRODUCE_COMMAND = "python -m vmc_fast.toy.examples"

# One appearance per held-out motion, different from each other, at the toy model's size (8 x 32 x 32).
_HELD_OUT_APPEARANCE = {
    "zigzag": ("circle", "red", "grey"),
    "figure-eight": ("square", "yellow", "dark-blue"),
    "spiral": ("triangle", "cyan", "black"),
}


def default_example(folder: Path) -> tuple[str, str]:
    """Render the example clip into `folder` (once) and return (video path, its motion-only prompt)."""
    clip = render_clip(DEFAULT_SPEC)
    path = Path(folder) / "example_zigzag.mp4"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_clip(clip, path)
    return str(path), clip.motion_caption


def held_out_spec(motion: str) -> ClipSpec:
    """The spec of the shipped example of a held-out motion (explicit motion parameters, seeded)."""
    import random

    if motion not in _HELD_OUT_APPEARANCE:
        raise VmcError(f"motion {motion!r} has no shipped example; choose one of {', '.join(HELD_OUT_MOTIONS)}")
    shape, colour, background = _HELD_OUT_APPEARANCE[motion]
    params = sample_motion_params(motion, random.Random(f"example-{motion}"), 8)
    return ClipSpec(shape=shape, colour=colour, background=background, motion=motion, num_frames=8, height=32,
                    width=32, seed=0, motion_params=params)


def held_out_example(motion: str, folder: Path | None = None) -> tuple[Path, Clip]:
    """(path of the shipped NAME.gif, the clip rendered from its spec with its exact track)."""
    path = (folder or EXAMPLES_DIR) / f"{motion}.gif"
    if not path.is_file():
        raise VmcError(f"example clip {path} is missing; write the examples with `{REPRODUCE_COMMAND}`")
    return path, render_clip(held_out_spec(motion))


def write_held_out_examples(folder: Path = EXAMPLES_DIR) -> list[Path]:
    """Write NAME.gif, NAME.txt and NAME.json for every held-out motion into `folder`; returns the gif paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for motion in HELD_OUT_MOTIONS:
        clip = render_clip(held_out_spec(motion))
        paths.append(write_clip(clip, folder / f"{motion}.gif"))
        (folder / f"{motion}.txt").write_text(clip.motion_caption + "\n")
        (folder / f"{motion}.json").write_text(json.dumps(clip_record(clip), indent=1) + "\n")
    return paths


if __name__ == "__main__":
    for written in write_held_out_examples(Path(sys.argv[1]) if len(sys.argv) > 1 else EXAMPLES_DIR):
        print(written)
