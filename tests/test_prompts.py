import codecs
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_frame_folder
from vmc_fast.config import DataConfig, GenerateConfig, RunConfig
from vmc_fast.errors import VmcError, VmcWarning
from vmc_fast.io.prompts import (
    appearance_invariant,
    cached_prompt_embeddings,
    looks_english,
    normalize_prompt,
    resolve_prompts,
)
from vmc_fast.runs.library import Manifest, QuietReporter, _run_one, plan_jobs


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


# --------------------------------------------------------------------------------------------- B1: encodings

CASES = Path(__file__).parent / "fixtures" / "cases"
CAPTION = "a red square moving right"


def _encoder_spy(calls: list):
    def load_encoder():
        calls.append(1)
        return lambda prompts: torch.stack([torch.full((3, 4), float(sum(map(ord, p)))) for p in prompts])
    return load_encoder


def test_the_bom_crlf_case_gives_the_typed_prompt_and_one_cache_entry(tmp_path):
    """Case bom_crlf_caption: a UTF-8 byte-order mark and CRLF must not reach the prompt or the cache key."""
    assert (CASES / "bom_crlf_caption.txt").read_bytes().startswith(codecs.BOM_UTF8)  # the input is as reported
    for name in ("bom_crlf_caption.mp4", "bom_crlf_caption.txt"):
        shutil.copy(CASES / name, tmp_path / name)
    video = tmp_path / "bom_crlf_caption.mp4"
    from_file = resolve_prompts([video], None)[video]
    assert from_file == CAPTION
    typed = RunConfig(prompt=CAPTION + "\r\n").prompt
    calls = []
    embeddings = cached_prompt_embeddings([from_file, typed], "m", tmp_path / "cache", _encoder_spy(calls))
    assert calls == [1] and len(list((tmp_path / "cache" / "prompt-embeddings").iterdir())) == 1
    assert torch.equal(embeddings[from_file], embeddings[typed])
    jobs = plan_jobs(RunConfig(data=DataConfig(videos=str(video)), out_dir=str(tmp_path / "out")))
    assert jobs[0].prompt == CAPTION


WRITERS = {
    "utf-8-sig, CRLF": lambda text: codecs.BOM_UTF8 + text.replace("\n", "\r\n").encode(),
    "utf-8, CR": lambda text: text.replace("\n", "\r").encode(),
    "utf-16 (Notepad 'Unicode')": lambda text: codecs.BOM_UTF16_LE + text.encode("utf-16-le"),
    "utf-16-be with BOM": lambda text: codecs.BOM_UTF16_BE + text.encode("utf-16-be"),
    "utf-32 with BOM": lambda text: text.encode("utf-32"),
    "trailing blank lines": lambda text: (text + "\n\n  \n").encode(),
}


def _table_text(container: str, caption: str) -> str:
    if container == "x.txt":
        return caption + "\n"
    if container == "prompts.json":
        return json.dumps({"x": caption}, ensure_ascii=False) + "\n"
    return f"x: {caption}\n"  # prompts.yaml


@pytest.mark.parametrize("container", ["x.txt", "prompts.json", "prompts.yaml"])
@pytest.mark.parametrize("writer", list(WRITERS))
def test_caption_files_read_the_same_whatever_the_editor_wrote(tmp_path, container, writer):
    video = tmp_path / "x.mp4"
    video.write_bytes(b"")
    (tmp_path / container).write_bytes(WRITERS[writer](_table_text(container, CAPTION)))
    assert resolve_prompts([video], None)[video] == CAPTION


@pytest.mark.parametrize("container", ["x.txt", "prompts.json", "prompts.yaml"])
def test_decomposed_accents_are_composed_like_typed_ones(tmp_path, container):
    video = tmp_path / "x.mp4"
    video.write_bytes(b"")
    (tmp_path / container).write_text(_table_text(container, "a cafe\u0301 sign moving left"), encoding="utf-8")
    resolved = resolve_prompts([video], None)[video]
    assert resolved == "a caf\u00e9 sign moving left" == RunConfig(prompt="a cafe\u0301 sign moving left").prompt


@pytest.mark.parametrize("container", ["x.txt", "prompts.yaml"])
def test_text_that_is_not_utf8_is_a_clear_error_naming_the_file(tmp_path, container):
    video = tmp_path / "x.mp4"
    video.write_bytes(b"")
    (tmp_path / container).write_bytes(_table_text(container, "un caf\u00e9 qui bouge").encode("latin-1"))
    with pytest.raises(VmcError, match=rf"{container}: not UTF-8 text \(byte 0xe9.*save it as UTF-8"):
        resolve_prompts([video], None)


def test_utf16_without_a_byte_order_mark_is_refused(tmp_path):
    video = tmp_path / "x.mp4"
    video.write_bytes(b"")
    (tmp_path / "x.txt").write_bytes(CAPTION.encode("utf-16-le"))
    with pytest.raises(VmcError, match="x.txt: holds NUL bytes"):
        resolve_prompts([video], None)


def test_typed_prompts_take_the_same_form_as_file_prompts(tmp_path):
    messy = "\ufeff a red\u00a0square\u200b  moving\r\nright "
    assert normalize_prompt(messy) == CAPTION
    assert RunConfig(prompt=messy).prompt == CAPTION
    cfg = GenerateConfig(prompt=messy, negative_prompt=" blurry\n", inversion_prompt="\ufeff", output=None)
    assert (cfg.prompt, cfg.negative_prompt, cfg.inversion_prompt) == (CAPTION, "blurry", "")
    with pytest.raises(ValueError, match="--prompt"):
        RunConfig(prompt="\ufeff\r\n")


# --------------------------------------------------------------------------------------------- B2: names, empty


@pytest.mark.parametrize("video_name, caption_name, kind", [
    ("CLIP.MP4", "CLIP.TXT", "file"), ("clip.mp4", "Clip.Txt", "file"), ("Clip.mp4", "clip.txt", "file"),
    ("Frames", "frames.TXT", "folder"), ("take.v2", "TAKE.V2.txt", "folder"),  # a folder name holding a dot
])
def test_caption_files_match_whatever_their_case(tmp_path, video_name, caption_name, kind):
    video = tmp_path / video_name
    video.write_bytes(b"") if kind == "file" else video.mkdir()
    (tmp_path / caption_name).write_text(CAPTION)
    assert resolve_prompts([video], None)[video] == CAPTION


def test_an_exact_name_wins_over_a_case_match(tmp_path):
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"")
    (tmp_path / "clip.txt").write_text("the exact one")
    (tmp_path / "CLIP.txt").write_text("another")
    assert resolve_prompts([video], None)[video] == "the exact one"


def test_several_case_matches_are_an_error_naming_them(tmp_path):
    video = tmp_path / "Clip.mp4"
    video.write_bytes(b"")
    (tmp_path / "CLIP.txt").write_text("one")
    (tmp_path / "clip.TXT").write_text("two")
    with pytest.raises(VmcError, match=r"several caption files match \(CLIP.txt, clip.TXT\)"):
        resolve_prompts([video], None)


def test_prompt_tables_match_names_and_keys_whatever_their_case(tmp_path):
    for name in ("CLIP.MP4", "bird.mp4"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "Prompts.YAML").write_text("clip: a red square moving right\nBIRD.MP4: a bird is flying\n")
    videos = [tmp_path / "CLIP.MP4", tmp_path / "bird.mp4"]
    assert list(resolve_prompts(videos, None).values()) == [CAPTION, "a bird is flying"]
    (tmp_path / "Prompts.YAML").write_text("clip: one\nClip.mp4: two\n")
    with pytest.raises(VmcError, match=r"several entries match video CLIP.MP4 \('clip', 'Clip.mp4'\)"):
        resolve_prompts(videos, None)
    (tmp_path / "prompts.json").write_text("{}")
    with pytest.raises(VmcError, match=r"several prompt tables \(Prompts.YAML, prompts.json\)"):
        resolve_prompts(videos, None)


@pytest.mark.parametrize("content", [b"", b"\n \r\n", codecs.BOM_UTF8 + b"\r\n", codecs.BOM_UTF16_LE])
def test_an_empty_caption_file_says_it_is_empty(tmp_path, content):
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"")
    (tmp_path / "clip.txt").write_bytes(content)
    cfg = RunConfig(data=DataConfig(videos=str(video)), out_dir=str(tmp_path / "out"))
    with pytest.raises(VmcError, match="its caption file clip.txt is empty; write the prompt there"):
        plan_jobs(cfg)
    with pytest.warns(VmcWarning, match="clip.txt is empty; using --prompt 'a bird is flying'"):
        jobs = plan_jobs(RunConfig(data=DataConfig(videos=str(video)), prompt="a bird is flying",
                                   out_dir=str(tmp_path / "out")))
    assert jobs[0].prompt == "a bird is flying"


def test_an_empty_caption_in_a_library_fails_that_video_with_the_reason(tmp_path):
    for name in ("a.mp4", "b.mp4"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.txt").write_text("a bird is flying")
    jobs = plan_jobs(RunConfig(data=DataConfig(videos=str(tmp_path)), out_dir=str(tmp_path / "out")))
    (tmp_path / "out").mkdir()
    entry = _run_one(None, jobs[0], {}, Manifest(tmp_path / "out"), QuietReporter())
    assert entry["status"] == "failed" and "its caption file a.txt is empty" in entry["error"]
    assert jobs[1].prompt == "a bird is flying"


def test_no_prompt_names_the_caption_file_of_a_dotted_folder(tmp_path):
    video = tmp_path / "take.v2"
    write_frame_folder(video, np.zeros((3, 8, 8, 3), np.uint8))
    with pytest.raises(VmcError, match=r"no prompt; .*put it in take.v2.txt beside the video"):
        plan_jobs(RunConfig(data=DataConfig(videos=str(video)), out_dir=str(tmp_path / "out")))


def test_an_empty_caption_file_stops_the_cli_before_anything_is_written(tmp_path):
    from typer.testing import CliRunner

    from vmc_fast.cli import app

    video = tmp_path / "clip.mp4"
    video.write_bytes(b"")
    (tmp_path / "clip.txt").write_text("  \n")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["train", "--videos", str(video), "--out", str(out), "--steps", "1"])
    assert result.exit_code == 2 and "clip.txt is empty" in " ".join(result.output.split())
    assert not out.exists()


# --------------------------------------------------------------------------------------------- B4: language


@pytest.mark.parametrize("caption", [
    "Un pájaro vuela sobre un lago en el bosque",
    "Ein Vogel fliegt über einem See im Wald",
    "一只鸟在森林里的湖上飞翔",
])
def test_derive_prompt_warns_on_a_caption_that_does_not_look_english(tmp_path, caption):
    video = tmp_path / "v.mp4"
    video.write_bytes(b"")
    (tmp_path / "v.txt").write_text(caption, encoding="utf-8")
    with pytest.warns(VmcWarning, match=r"--derive-prompt: the caption of v.mp4 .* does not look English.*v.txt"):
        jobs = plan_jobs(RunConfig(data=DataConfig(videos=str(video)), derive_prompt=True,
                                   out_dir=str(tmp_path / "out")))
    assert jobs[0].prompt == caption


@pytest.mark.parametrize("caption, derived", [
    ("A bird is flying above a lake in the forest", "A bird is flying"),  # the paper's example
    ("a red square moving right", "a red square moving right"),  # English, no place phrase
])
def test_derive_prompt_stays_quiet_on_english(tmp_path, caption, derived):
    video = tmp_path / "v.mp4"
    video.write_bytes(b"")
    (tmp_path / "v.txt").write_text(caption)
    with warnings.catch_warnings():
        warnings.simplefilter("error", VmcWarning)
        jobs = plan_jobs(RunConfig(data=DataConfig(videos=str(video)), derive_prompt=True,
                                   out_dir=str(tmp_path / "out")))
    assert jobs[0].prompt == derived


def test_looks_english():
    assert looks_english("a dog is running") and looks_english("The cat jumps")
    assert not looks_english("Un perro corre") and not looks_english("Le chat saute sur la table")
    assert not looks_english("犬が走っている") and not looks_english("")
