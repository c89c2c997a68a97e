"""benchmarks/gpu: the wheel plan (what travels to the GPU machine) and the run command's dry run, on the CPU."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GPU_DIR = ROOT / "benchmarks" / "gpu"


def _load(name: str):
    sys.path.insert(0, str(GPU_DIR))
    try:
        spec = importlib.util.spec_from_file_location(f"gpu_{name}", GPU_DIR / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(GPU_DIR))


wheels = _load("wheels")


def _fake_wheel(folder: Path, name: str, version: str, size: int = 100, requires: str = "",
                members: dict[str, bytes] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{version}-py3-none-any.whl"
    members = {f"{name}/__init__.py": b"x" * size, **(members or {})}
    record = "".join(f"{m},sha256=,{len(d)}\n" for m, d in members.items())
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for member, data in members.items():
            archive.writestr(member, data)
        archive.writestr(f"{name}-{version}.dist-info/METADATA",
                         f"Name: {name}\nVersion: {version}\n{requires}")
        archive.writestr(f"{name}-{version}.dist-info/RECORD", record)
    return path


def test_wheels_txt_parses_and_names_each_package_once():
    requirements = wheels.read_requirements()
    names = [r.key for r in requirements]
    assert len(names) == len(set(names)) >= 8
    assert {"diffusers", "deepspeed", "bitsandbytes"} <= set(names)
    assert all(r.version and r.why for r in requirements)


def test_bad_wheels_line_is_named(tmp_path):
    bad = tmp_path / "wheels.txt"
    bad.write_text("diffusers==0.42.1 required fine\nxformers maybe\n")
    with pytest.raises(ValueError, match=r"wheels.txt:2"):
        wheels.read_requirements(bad)


def test_plan_carries_what_fits_and_reports_the_rest(tmp_path, monkeypatch):
    req = wheels.Requirement
    needed = [req("alpha", "1.0", True), req("beta", "2.0", False), req("gamma", "3.0", False),
              req("delta", "4.0", True)]
    folder = tmp_path / "whl"
    _fake_wheel(folder, "alpha", "1.0", size=1000)
    _fake_wheel(folder, "beta", "2.0", size=50_000)
    _fake_wheel(folder, "gamma", "3.0", requires="Requires-Dist: torch>=99\n")
    monkeypatch.setattr(wheels, "repo_bytes", lambda root=None: 10_000)
    monkeypatch.setattr(wheels, "CARRY_LIMIT_BYTES", 30_000)
    result = wheels.plan(needed, folder)
    assert [r.name for r, _ in result.carried] == ["alpha"]
    assert [r.name for r in result.missing] == ["delta"]
    left = dict((r.name, why) for r, why in result.left_out)
    assert "does not fit" in left["beta"] and "needs torch >=99" in left["gamma"]
    assert not result.ok  # delta is required and missing
    report = wheels.report(result)
    assert "MISSING delta==4.0" in report and "LEFT OUT beta==2.0" in report

    _fake_wheel(folder, "delta", "4.0")
    assert wheels.plan(needed, folder).ok


def test_slimming_drops_libraries_and_their_record_lines(tmp_path):
    libs = {f"bitsandbytes/libbitsandbytes_{v}.so": b"\0" * 5000 for v in ("cuda118", "cuda130", "cpu", "rocm64")}
    path = _fake_wheel(tmp_path, "bitsandbytes", "0.50.2", members=libs)
    saved = wheels.slim_wheel(path, wheels.SLIM["bitsandbytes"])
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        record = archive.read("bitsandbytes-0.50.2.dist-info/RECORD").decode()
    kept = sorted(n.rsplit("_", 1)[1] for n in names if ".so" in n)
    assert kept == ["cpu.so", "cuda130.so"] and saved > 0
    assert "cuda118" not in record and "cuda130" in record
    assert wheels.slim_wheel(path, wheels.SLIM["bitsandbytes"]) == 0  # nothing left to drop


def test_run_parses_parts_and_budgets():
    run = _load("run")
    args = run.parse_args(["bench,setup", "--budget", "bench=30", "--out", "/tmp/x"])
    assert args.parts == ["setup", "bench"] and args.budgets["bench"] == 30
    pack = run.parse_args(["setup,pack"])
    assert pack.parts == ["setup", "pack"] and pack.budgets["pack"] <= 180  # fits about 3 minutes
    assert "pack" not in run.parse_args([]).parts  # the default parts fill one 10-minute command already
    with pytest.raises(SystemExit):
        run.parse_args(["warp"])
    with pytest.raises(SystemExit):
        run.parse_args(["--budget", "tests=soon"])


@pytest.mark.slow
def test_dry_run_checks_the_parts_a_cpu_can_check(tmp_path):
    """Without wheels (as in CI) only the setup part can fail; the tests, profile and bench parts must pass."""
    done = subprocess.run(["bash", str(GPU_DIR / "run.sh"), "tests,profile,bench,pack", "--dry-run", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = (tmp_path / "summary.txt").read_text()
    assert "tests: ok" in summary and "profile: ok" in summary and "bench: ok" in summary
    assert "pack: ok" in summary and "--pack" in summary
    assert "run(command='bash benchmarks/gpu/run.sh --out $OUT', carry=['.whl']" in done.stdout


def test_the_toy_part_reads_the_rate_of_the_pretraining_log():
    from vmc_fast.toy.pretrain import PretrainConfig, TrainState, _progress

    run = _load("run")
    cfg = PretrainConfig(out="unused", steps=100)
    state = TrainState(unet=None, text_encoder=None, optimizer=None, step=40)
    line = _progress(cfg, state, [{"loss": 0.5, "eps": 0.4, "vlb": 0.1}], rate=12.3456)
    assert run.steps_per_second(f"noise\n{line}\nmore noise\n") == 12.346
    assert run.steps_per_second("no progress yet") is None
