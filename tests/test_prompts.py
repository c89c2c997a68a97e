import json

import pytest
import torch

from vmc_fast.errors import VmcError
from vmc_fast.io.prompts import (
    appearance_invariant,
    cached_prompt_embeddings,
    resolve_prompts,
)


@pytest.mark.parametrize("caption, expected", [
    ("A bird is flying above a lake in the forest", "A bird is flying"),  # the paper's examples
    ("a cat is roaring on the grass under the tree", "a cat is roaring"),
    ("a red circle moving in a zigzag on a grey background", "a red circle moving in a zigzag"),
    ("a dog running in circles in the park.", "a dog running in circles"),
    ("a man walking backward", "a man walking backward"),
    ("a ball moving to the left", "a ball moving to the left"),
    ("A horse galloping through a field, with mountains", "A horse galloping"),
])
def test_appearance_invariant(caption, expected):
    assert appearance_invariant(caption) == expected


def test_prompt_sources(tmp_path):
    for name in ("a.mp4", "b.mp4", "c.mp4", "d.mp4"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "a.txt").write_text("a bird is flying\n")
    (tmp_path / "prompts.yaml").write_text("b: a cat is roaring\nc.mp4: a car driving\n")
    videos = sorted(tmp_path.glob("*.mp4"))
    prompts = resolve_prompts(videos, default="fallback")
    assert [prompts[v] for v in videos] == ["a bird is flying", "a cat is roaring", "a car driving", "fallback"]
    assert resolve_prompts(videos, default=None)[videos[3]] is None


def test_prompts_json_and_bad_table(tmp_path):
    (tmp_path / "x.mp4").write_bytes(b"")
    (tmp_path / "prompts.json").write_text(json.dumps({"x": "a fish swimming"}))
    assert resolve_prompts([tmp_path / "x.mp4"], None)[tmp_path / "x.mp4"] == "a fish swimming"
    (tmp_path / "prompts.json").write_text("[1, 2]")
    with pytest.raises(VmcError, match="mapping of video name"):
        resolve_prompts([tmp_path / "x.mp4"], None)


def test_embedding_cache_builds_the_encoder_only_on_a_miss(tmp_path):
    calls = []

    def load_encoder():
        calls.append(1)
        return lambda prompts: torch.stack([torch.full((3, 4), float(len(p))) for p in prompts])

    first = cached_prompt_embeddings(["ab", "abc"], "m", tmp_path, load_encoder)
    second = cached_prompt_embeddings(["abc", "ab"], "m", tmp_path, load_encoder)
    assert len(calls) == 1
    assert torch.equal(first["abc"], second["abc"]) and float(second["ab"][0, 0]) == 2.0
    cached_prompt_embeddings(["ab"], "other-model", tmp_path, load_encoder)
    assert len(calls) == 2  # the cache is keyed by model as well as prompt
