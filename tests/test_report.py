"""`vmc-fast library report DIR` and `vmc-fast library DIR --json` (issue 13 item 6): a static page that opens
offline, one card per video, and the library's state for scripts."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import moving_square_frames, write_video
from vmc_fast.cli import app
from vmc_fast.runs.metrics import metrics_path, read_metrics
from vmc_fast.runs.report import REPORT

runner = CliRunner()
PROMPT = "a square moving right"


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """A finished run of two good videos and one corrupt one (recorded failed); the first good one has per-step
    metrics, as the run writes them, the second none."""
    root = tmp_path_factory.mktemp("library")
    videos = root / "videos"
    videos.mkdir()
    write_video(videos / "left<&>.mp4", moving_square_frames(step=2))
    write_video(videos / "right.mp4", moving_square_frames(step=3))
    (videos / "broken.mp4").write_text("not a video")
    out = root / "out"
    result = runner.invoke(app, ["train", "--videos", str(videos), "--prompt", PROMPT, "--out", str(out),
                                 "--steps", "2"], env={"VMC_FAST_CACHE": str(root / "cache")})
    assert result.exit_code == 1, result.output  # the corrupt video failed, the others are done
    path = metrics_path(out, "left<&>")
    if not path.is_file():  # written by the run once per-step metrics exist; the same format here meanwhile
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s, "grad_norm": 0.1, "lr": 1e-4, "seconds": s})
                                + "\n" for s in (1, 2)) + '{"step": 3, "lo')  # the last line cut by a kill
    (out / "right").mkdir(exist_ok=True)
    (out / "right" / "metrics.jsonl").unlink(missing_ok=True)
    return root, out


class _Page(HTMLParser):
    """Checks nesting (every opened element closed in order, void elements aside) and collects what the page
    refers to."""

    VOID = {"meta", "img", "br", "hr", "input", "link", "source", "polyline", "path", "line", "circle", "rect"}

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.refs, self.cards, self.text = [], [], [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.refs += [v for k, v in attrs.items() if k in ("src", "href") and v]
        if tag == "div" and "card" in (attrs.get("class") or "").split():
            self.cards.append(attrs["class"])
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.refs += [v for k, v in dict(attrs).items() if k in ("src", "href") and v]

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def test_the_report_names_every_video_and_opens_offline(library):
    _, out = library
    result = runner.invoke(app, ["library", "report", str(out)])
    assert result.exit_code == 0, result.output
    page = (out / REPORT).read_text()
    assert page.startswith("<!DOCTYPE html>")
    parser = _Page()
    parser.feed(page)
    parser.close()
    assert parser.errors == [] and parser.stack == []
    assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/|@import|url\(", page, re.IGNORECASE)
    assert all(ref.startswith("data:") for ref in parser.refs)
    assert sorted(parser.cards) == ["card done", "card done", "card failed"]
    text = "".join(parser.text)
    for name in ("left<&>.mp4", "right.mp4", "broken.mp4"):
        assert name in text  # named, and escaped in the markup
    assert "left<&>.mp4" not in page and "left&lt;&amp;&gt;.mp4" in page
    assert "cannot be decoded" in text  # the failed video's reason
    assert PROMPT in text and "final loss" in text
    assert page.count("<svg") == 1 and "no per-step metrics" in text  # the one video with metrics has a curve
    assert not list(out.glob(".*tmp*"))


def test_a_report_of_a_folder_without_a_run_is_refused(tmp_path):
    result = runner.invoke(app, ["library", "report", str(tmp_path)])
    assert result.exit_code == 2 and "no manifest.jsonl" in result.output
    assert not (tmp_path / REPORT).exists()


def test_library_json_parses_and_holds_every_video(library):
    _, out = library
    result = runner.invoke(app, ["library", str(out), "--json"])
    assert result.exit_code == 0, result.output
    state = json.loads(result.stdout)
    assert state["counts"] == {"done": 2, "failed": 1} and state["ok"] is False
    videos = {Path(v["video"]).name: v for v in state["videos"]}
    assert set(videos) == {"left<&>.mp4", "right.mp4", "broken.mp4"}
    assert videos["left<&>.mp4"]["metrics"] == str(metrics_path(out, "left<&>"))
    assert videos["right.mp4"]["metrics"] is None and "cannot be decoded" in videos["broken.mp4"]["error"]
    # The command as it was before `report` existed, and its explicit name.
    for args in (["library", str(out)], ["library", "show", str(out)]):
        shown = runner.invoke(app, args)
        assert shown.exit_code == 0 and "2 done, 1 failed" in shown.output, shown.output


def test_metrics_lines_cut_by_a_kill_are_skipped(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    assert read_metrics(tmp_path / "absent.jsonl") == []


@pytest.mark.slow
def test_previews_show_the_reference_beside_a_sample_of_its_adapter(library):
    _, out = library
    result = runner.invoke(app, ["library", "report", str(out), "--previews", "--steps", "2"])
    assert result.exit_code == 0, result.output
    page = (out / REPORT).read_text()
    parser = _Page()
    parser.feed(page)
    assert parser.errors == []
    gifs = [ref for ref in parser.refs if ref.startswith("data:image/gif;base64,")]
    assert len(gifs) == 4  # reference and sample of each done video
    assert "no preview" not in page
