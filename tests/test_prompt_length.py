"""Prompts longer than the text encoder reads: a warning with the dropped end, and a record of what was encoded
(embedding cache, adapter metadata, manifest, generate's sidecar), for every encoder family."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from vmc_fast.config import DataConfig, GenerateConfig, ModelConfig, RunConfig, TrainConfig
from vmc_fast.errors import VmcWarning
from vmc_fast.io.prompts import embedding_model_key, encode_prompts
from vmc_fast.models import load_backbone
from vmc_fast.tuning.adapters import read_adapter

LONG = "a red square moving right " * 8 + "quickly then stops"
SHORT = "a red square moving right"
# The toy tokenizer has one token per known word, so its long prompt needs more words.
TOY_LONG = "a red square moving right " * 16 + "quickly then stops"


@pytest.fixture(scope="module", params=["tiny-random", "show1-tiny-random", "toy"])
def encoder_case(request):
    backbone = load_backbone(request.param)
    return request.param, backbone, backbone.load_text_encoder()


def _long(model_id: str) -> str:
    return TOY_LONG if model_id == "toy" else LONG


def _flip(text: str, index: int) -> str:
    return text[:index] + ("x" if text[index] != "x" else "z") + text[index + 1:]


def test_the_encoded_text_is_what_the_encoder_reads(encoder_case):
    model_id, _, encoder = encoder_case
    prompt = _long(model_id)
    report = encoder.encoded_text(prompt)
    assert report.truncated and report.num_tokens > report.max_tokens == 77
    assert prompt.startswith(report.encoded) and len(report.encoded) < len(prompt)
    assert report.dropped.endswith("quickly then stops") and prompt[len(report.encoded):].strip() == report.dropped
    # The cut is exact: changing the first dropped character changes nothing, the last encoded one does.
    cut = len(report.encoded)
    first_dropped = cut + len(prompt[cut:]) - len(prompt[cut:].lstrip())
    states = encoder([prompt, _flip(prompt, first_dropped), _flip(prompt, cut - 1)])
    assert torch.equal(states[0], states[1]) and not torch.equal(states[0], states[2])
    short = encoder.encoded_text(SHORT)
    assert not short.truncated and short.encoded == SHORT and short.dropped == ""


def test_a_long_prompt_warns_with_its_dropped_end_on_every_call(encoder_case, tmp_path):
    model_id, backbone, encoder = encoder_case
    prompt = _long(model_id)
    key = embedding_model_key(model_id, backbone.family)
    builds = []

    def load_encoder():
        builds.append(1)
        return encoder

    for _ in range(2):  # the second call is a cache hit: the encoder is not built, the warning still comes
        with pytest.warns(VmcWarning, match=rf"is \d+ tokens; {model_id}'s text encoder reads 77") as record:
            encoded = encode_prompts([prompt, SHORT], key, tmp_path, load_encoder)
        assert len(record) == 1 and "quickly then stops" in str(record[0].message)
        assert encoded[prompt].encoded_text == encoder.encoded_text(prompt).encoded
        assert encoded[SHORT].encoded_text == SHORT
    assert builds == [1]


def test_a_short_prompt_does_not_warn(tmp_path):
    backbone = load_backbone("tiny-random")
    with warnings.catch_warnings():
        warnings.simplefilter("error", VmcWarning)
        encode_prompts([SHORT], "k", tmp_path, backbone.load_text_encoder)


def test_cache_entries_without_a_token_report_are_recomputed(tmp_path):
    from vmc_fast.io.files import atomic_save_file
    from vmc_fast.io.prompts import _cache_key

    backbone = load_backbone("tiny-random")
    folder = tmp_path / "prompt-embeddings"
    folder.mkdir()
    atomic_save_file({"states": torch.zeros(77, 32)}, folder / f"{_cache_key('k', LONG)}.safetensors",
                     {"prompt": LONG, "model": "k"})  # written before token reports existed
    with pytest.warns(VmcWarning, match="quickly then stops"):
        encoded = encode_prompts([LONG], "k", tmp_path, backbone.load_text_encoder)
    assert encoded[LONG].states.abs().sum() > 0


@pytest.mark.parametrize("model_id", ["tiny-random", "show1-tiny-random"])
def test_adapter_and_manifest_record_the_encoded_prompt(square_video, tmp_path, model_id):
    from vmc_fast.runs.launch import train
    from vmc_fast.runs.library import Manifest, QuietReporter

    (square_video.parent / "square.txt").write_text(LONG)
    cfg = RunConfig(data=DataConfig(videos=str(square_video), num_frames=4, height=16, width=16),
                    model=ModelConfig(model_id=model_id), train=TrainConfig(steps=1),
                    out_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"))
    with pytest.warns(VmcWarning, match="quickly then stops"):
        summary = train(cfg, QuietReporter())
    assert summary.ok
    entry = next(iter(Manifest(tmp_path / "out").read().values()))
    _, info = read_adapter(entry["adapter"])
    assert info.prompt == LONG and info.prompt_truncated
    assert LONG.startswith(info.encoded_prompt) and len(info.encoded_prompt) < len(LONG)
    assert entry["encoded_prompt"] == info.encoded_prompt and entry["prompt_truncated"] is True


def test_generate_records_what_each_prompt_encoded(tmp_path):
    out = tmp_path / "g.gif"
    cfg = GenerateConfig(model_id="tiny-random", prompt=LONG, num_inference_steps=1, num_frames=2, height=16,
                         width=16, output=str(out), cache_dir=str(tmp_path / "cache"))
    from vmc_fast.inference.generate import generate

    with pytest.warns(VmcWarning, match="quickly then stops"):
        result = generate(cfg)
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["prompts"]["prompt"] == result.prompts["prompt"]
    assert LONG.startswith(sidecar["prompts"]["prompt"]["encoded"]) and sidecar["prompts"]["prompt"]["dropped"]
    assert sidecar["prompts"]["negative"]["encoded"] == ""


def test_tokenizers_without_offsets_report_the_longest_start_they_encode():
    """Slow (Python) tokenizers have no character offsets: the report then ends at the last whole token run."""
    from vmc_fast.io.prompts import token_report

    fast = load_backbone("tiny-random").load_text_encoder().tokenizer

    class Slow:  # the fast tokenizer seen through the interface of a slow one
        is_fast = False
        all_special_ids = fast.all_special_ids

        def __call__(self, *args, **kwargs):
            kwargs.pop("return_offsets_mapping", None)
            return fast(*args, **kwargs)

    exact, slow = token_report(fast, LONG, 77), token_report(Slow(), LONG, 77)
    assert slow.num_tokens == exact.num_tokens and LONG.startswith(slow.encoded)
    assert len(exact.encoded) - len(slow.encoded) <= len("moving")  # at most the word cut between two tokens
    kept = fast(LONG, truncation=True, max_length=77)["input_ids"][1:-1]
    ids = fast(slow.encoded, add_special_tokens=False)["input_ids"]
    assert 0 < len(ids) <= len(kept) and ids == kept[: len(ids)]  # its tokens begin what the encoder read
    assert LONG[len(slow.encoded):].strip() == slow.dropped
