"""--pack K: K videos through one forward and backward pass of the shared frozen UNet, each with its own Q/K/V.
Packed must equal one at a time (fp32, CPU), whatever pack or position a video lands in."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import moving_square_frames, write_video
from vmc_fast.config import DataConfig, ModelConfig, ParallelConfig, RunConfig, TrainConfig
from vmc_fast.runs.launch import train
from vmc_fast.tuning.packing import PackedLinear, PackState, clip_per_video, video_generator

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _videos(folder: Path, count: int = 3) -> Path:
    folder.mkdir()
    for index in range(count):  # different motions: a mix-up of slices shows
        write_video(folder / f"v{index}.mp4", moving_square_frames(step=2 + index))
    return folder


RECIPE = {"steps": 3, "learning_rate": 1e-2, "precision": "fp32", "grad_clip": 0.01, "adam_eps": 1e-4}
"""Every step clips (per-video norms are about 0.06-0.2 here), and Adam's eps is near the clipped gradients' size, so
an update depends on each video's clipping factor (a clip over the whole pack would show) while float rounding
does not flip Adam's first steps (with eps 1e-8 they are lr x sign(g), and sign(1e-9) is noise)."""


def _run(videos: Path, out: Path, pack: str, model: str = "tiny-random", **train_options) -> dict[str, dict]:
    cfg = RunConfig(data=DataConfig(videos=str(videos)), model=ModelConfig(model_id=model),
                    train=TrainConfig(**{**RECIPE, **train_options}),
                    parallel=ParallelConfig(pack=pack), prompt="a square moving", out_dir=str(out),
                    cache_dir=str(out.parent / "cache"), adapter_dtype="fp32")  # exact tensors, compared at 1e-5
    summary = train(cfg)
    return {Path(e["video"]).name: e for e in summary.entries}


def _adapters(entries: dict[str, dict]) -> dict[str, dict[str, torch.Tensor]]:
    return {name: load_file(e["adapter"]) for name, e in entries.items() if e["status"] == "done"}


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("model", ["tiny-random", "show1-tiny-random"])
def test_packed_equals_one_at_a_time(model, tmp_path):
    videos = _videos(tmp_path / "videos")
    alone = _adapters(_run(videos, tmp_path / "k1", "1", model))
    assert len(alone) == 3
    assert _max_difference(alone["v0.mp4"], alone["v1.mp4"]) > 1e-3  # the videos do differ
    for pack in ("2", "3"):  # 2: a full pack then a partial one
        packed = _adapters(_run(videos, tmp_path / f"k{pack}", pack, model))
        assert packed.keys() == alone.keys()
        for name in alone:
            assert _max_difference(packed[name], alone[name]) < 1e-5, (pack, name)
            assert all(packed[name][k].shape == alone[name][k].shape for k in alone[name])


def test_each_video_of_a_pack_writes_its_own_metrics_as_if_tuned_alone(tmp_path):
    from vmc_fast.runs.metrics import metrics_path, read_metrics

    videos = _videos(tmp_path / "videos")
    runs = {pack: _run(videos, tmp_path / f"k{pack}", pack) for pack in ("1", "2")}
    curves = {pack: {name: read_metrics(metrics_path(tmp_path / f"k{pack}", e["adapter_name"]))
                     for name, e in entries.items()} for pack, entries in runs.items()}
    for name in curves["1"]:
        alone, packed = curves["1"][name], curves["2"][name]
        assert [r["step"] for r in packed] == [1, 2, 3] and all(r["lr"] == RECIPE["learning_rate"] for r in packed)
        for key in ("loss", "grad_norm"):
            assert [r[key] for r in packed] == pytest.approx([r[key] for r in alone], rel=1e-5, abs=1e-7), (name, key)
    assert curves["2"]["v0.mp4"][0]["loss"] != curves["2"]["v1.mp4"][0]["loss"]  # not the pack's mean


def test_a_video_draws_the_same_in_any_position(tmp_path):
    """v1 alone in a run (pack 1) equals v1 second in a pack of 3: draws follow the video, not the slot."""
    videos = _videos(tmp_path / "videos")
    packed = _adapters(_run(videos, tmp_path / "k3", "3"))
    solo = tmp_path / "solo"
    solo.mkdir()
    (solo / "v1.mp4").write_bytes((videos / "v1.mp4").read_bytes())
    alone = _adapters(_run(solo, tmp_path / "k1", "1"))
    assert _max_difference(packed["v1.mp4"], alone["v1.mp4"]) < 1e-5


def test_a_non_finite_video_fails_alone_and_the_pack_goes_on(tmp_path, monkeypatch):
    from vmc_fast.tuning.session import TuningSession

    videos = _videos(tmp_path / "videos")
    read_input = TuningSession.read_input

    def poisoned(self, video):
        clip, info = read_input(self, video)
        return (clip * math.nan if Path(video).name == "v1.mp4" else clip), info

    alone = _adapters(_run(videos, tmp_path / "k1", "1"))
    monkeypatch.setattr(TuningSession, "read_input", poisoned)
    entries = _run(videos, tmp_path / "k3", "3")
    assert entries["v1.mp4"]["status"] == "failed" and entries["v1.mp4"]["nonfinite_step"] == 1
    assert "the loss became nan at step 1" in entries["v1.mp4"]["error"]
    assert not (tmp_path / "k3" / "adapters" / "v1.safetensors").exists()
    packed = _adapters(entries)
    assert sorted(packed) == ["v0.mp4", "v2.mp4"]
    for name in packed:  # the others are exactly what they are alone
        assert _max_difference(packed[name], alone[name]) < 1e-5


def test_an_unreadable_video_fails_before_the_pack_and_the_rest_finish(tmp_path):
    videos = _videos(tmp_path / "videos")
    (videos / "broken.mp4").write_bytes(b"not a video")
    entries = _run(videos, tmp_path / "out", "2")
    assert entries["broken.mp4"]["status"] == "failed"
    assert [n for n, e in sorted(entries.items()) if e["status"] == "done"] == ["v0.mp4", "v1.mp4", "v2.mp4"]
    manifest = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == 4


def test_packed_linear_applies_each_video_its_own_slice():
    torch.manual_seed(0)
    linears = [torch.nn.Linear(4, 3) for _ in range(3)]
    packed = PackedLinear(linears[0], PackState(num_slots=3, num_active=3))
    with torch.no_grad():
        for k, linear in enumerate(linears):
            packed.weight[k] = linear.weight
            linear.bias.copy_(linears[0].bias)  # the bias is frozen and shared
    x = torch.randn(3 * 5, 2, 4)  # batch-major: rows 0-4 video 0, 5-9 video 1, ...
    expected = torch.cat([linears[k](x[5 * k:5 * (k + 1)]) for k in range(3)])
    torch.testing.assert_close(packed(x), expected)
    packed.state.num_active = 2  # a partial pack uses the first slices only
    torch.testing.assert_close(packed(x[:10]), expected[:10])


def test_clipping_is_per_video_as_clip_grad_norm_would_be_alone():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(3, 4, 5)), torch.nn.Parameter(torch.zeros(3, 6))]
    grads = [torch.randn(3, 4, 5) * torch.tensor([1.0, 10.0, 0.01]).view(3, 1, 1), torch.randn(3, 6)]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    norms = clip_per_video(params, 1.0, 3)
    for k in range(3):
        alone = [torch.nn.Parameter(torch.zeros_like(g[k])) for g in grads]
        for p, g in zip(alone, grads):
            p.grad = g[k].clone()
        norm = torch.nn.utils.clip_grad_norm_(alone, 1.0)
        assert math.isclose(float(norms[k]), float(norm), rel_tol=1e-6)
        for p, a in zip(params, alone):
            torch.testing.assert_close(p.grad[k], a.grad)


def test_generators_follow_the_video_name_and_rank():
    def first(*args):
        return torch.rand(3, generator=video_generator(*args))

    assert torch.equal(first(0, "a.mp4"), first(0, "a.mp4"))
    assert not torch.equal(first(0, "a.mp4"), first(0, "b.mp4"))
    assert not torch.equal(first(0, "a.mp4"), first(1, "a.mp4"))
    assert not torch.equal(first(0, "a.mp4", 0), first(0, "a.mp4", 1))


@pytest.mark.parametrize("value", ["0", "257", "two", "-1"])
def test_a_bad_pack_is_refused(value):
    with pytest.raises(ValueError, match="--pack"):
        ParallelConfig(pack=value)


def test_pack_refuses_fp16():
    with pytest.raises(ValueError, match="--pack: 2 does not combine with --precision fp16"):
        RunConfig(train=TrainConfig(precision="fp16"), parallel=ParallelConfig(pack="2"))


def test_pack_auto_prints_its_estimate_and_fits_the_videos(tmp_path, capsys):
    videos = _videos(tmp_path / "videos")
    entries = _run(videos, tmp_path / "out", "auto")
    assert {e["status"] for e in entries.values()} == {"done"}
    err = capsys.readouterr().err
    assert "--pack auto:" in err and "GiB free" in err and "3 video(s) per pack" in err  # tiny: all 3 fit


def test_one_adamw_over_packed_tensors_moves_each_slice_as_its_own_adamw_would():
    """AdamW (with weight decay) is elementwise: one optimizer over (K, ...) tensors equals K optimizers."""
    torch.manual_seed(0)
    start = [torch.randn(3, 4, 5), torch.randn(3, 6)]
    packed = [torch.nn.Parameter(t.clone()) for t in start]
    alone = [[torch.nn.Parameter(t[k].clone()) for t in start] for k in range(3)]
    kwargs = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    optimizers = [torch.optim.AdamW(packed, **kwargs)] + [torch.optim.AdamW(a, **kwargs) for a in alone]
    for _ in range(4):
        grads = [torch.randn_like(t) * torch.tensor([1.0, 1e-3, 1e3]).view(3, *[1] * (t.dim() - 1)) for t in start]
        for p, g in zip(packed, grads):
            p.grad = g.clone()
        for k in range(3):
            for p, g in zip(alone[k], grads):
                p.grad = g[k].clone()
        for optimizer in optimizers:
            optimizer.step()
    for k in range(3):
        for p, a in zip(packed, alone[k]):
            torch.testing.assert_close(p.detach()[k], a.detach(), rtol=0, atol=1e-7)


def test_pack_with_a_lora_is_refused_with_the_way_out():
    with pytest.raises(ValueError, match=r"--pack: 2 does not combine with --lora-rank yet.*--pack 1"):
        RunConfig(model=ModelConfig(model_id="tiny-random", lora_rank=4), parallel=ParallelConfig(pack="2"))
    RunConfig(model=ModelConfig(model_id="tiny-random", lora_rank=4), parallel=ParallelConfig(pack="1"))
