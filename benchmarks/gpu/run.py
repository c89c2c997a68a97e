"""Everything a GPU slot measures, as one command with a time budget per part (`benchmarks/gpu/run.sh`).

GPU time comes in short slots (one H200, about 15 minutes in all, one command at most 10), so the whole check is
one prepared command that returns whatever finished even when it is cut short: every part writes its files into
OUT as it ends, and `summary.txt` gains one line per part (status, seconds, reason) the moment it is known.

Parts, in order (default: all):
- ``setup``: the device's name and driver; installs the wheels carried in ``.whl/`` (see wheels.txt and
  fetch-wheels.sh) and vmc-fast itself into SITE; probes each optional library with a real CUDA call. A library
  that does not import or run is recorded with its error; the tests and presets that need it skip with it.
- ``tests``: ``pytest -m gpu`` (tests/test_gpu.py and the other gpu-marked tests) -> tests.log.
- ``profile``: 3 training steps of the ``fast-eager`` preset on show1-base-arch under torch.profiler ->
  profile-fast-eager.txt (the operators that take the device's time, and the kernel launches per step).
- ``bench``: ``vmc-fast bench`` on show1-base-arch at 8x40x64, the paper preset beside ours and the one-lever
  ablations in one invocation -> bench.log, bench-cuda.jsonl (one JSON record per finished preset).
- ``pack`` (not in the default list; run it as ``run.sh setup,pack``, about 3 minutes): ``vmc-fast bench --pack
  1,2,4,8`` on show1-base-arch at 8x40x64 (fast-eager: bf16, no compile), one fresh process per K -> pack.log,
  pack/bench-cuda.jsonl: videos/hour per K (400 steps a video), the issue-13 target being 400 on one H200. K=8
  needs about 85 GB (8 x (8 GB activations + 2.15 GB adapter state) + 3.2 GB frozen): an H200, not an H100.
- ``toy`` (not in the default list; run it as ``run.sh setup,toy``): pretrains the toy model for as many steps as
  fit its budget (measured first, so the run is an exact, reproducible command), exports the weights and runs
  `vmc-fast eval` on them (no-tuning and cos, from noise and from inversion) -> toy.tar: the exported weights with
  their README (the command), the eval's files and the logs.

Files in OUT (at most 8 come back from the device tool): summary.txt, setup.log, tests.log, profile.log,
profile-fast-eager.txt, bench.log, bench-cuda.jsonl; pack.log and pack/bench-cuda.jsonl for the pack part; toy.tar
for the toy part.

``--dry-run`` (on the CPU) checks what can be checked without a GPU: the wheel list against .whl/ and the 64 MiB
carry limit, that pytest collects the gpu tests, that the bench accepts every preset and option the part passes;
then prints the exact device call and the paths to carry. Exit status: 0 when every part ran (or would run), 1
otherwise.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
import wheels  # noqa: E402  (benchmarks/gpu/wheels.py: this folder is not a package)

SITE = Path(os.environ.get("VMC_FAST_GPU_SITE", "/tmp/vmc-fast-site"))
"""Where setup installs the carried wheels and vmc-fast on the GPU machine (prepended to PYTHONPATH)."""
BENCH_PRESETS = ("paper", "fast", "fast-eager", "fast+int8", "paper+bf16", "paper-t5-freed", "fast+ckpt",
                 "fast+triton", "fast+xformers", "fast-eager+int8")
"""The paper's setup, ours, then one lever at a time; in the order they run, so a cut-short run keeps the most
telling ones."""
BENCH_STEPS = int(os.environ.get("VMC_FAST_GPU_BENCH_STEPS", 100))
"""Timed steps per preset (its mean step time is reported for 400 steps) and warm-up steps (compilation).
Environment overrides for a short rerun: VMC_FAST_GPU_BENCH_PRESETS, VMC_FAST_GPU_BENCH_STEPS, VMC_FAST_GPU_TESTS_K."""
BENCH_WARMUP = 3
PROFILED_PRESET = "fast-eager"
"""Eager, so that the profile shows the operators themselves; at 221 ms/step and 4.7% MFU on an H200
(2026-11-30) it is far from its FLOP bound."""
PACK_SIZES = os.environ.get("VMC_FAST_GPU_PACK_SIZES", "1,2,4,8")
"""K of the pack part (VMC_FAST_GPU_PACK_SIZES overrides, e.g. 1,8,16 for a rerun)."""
PACK_STEPS = int(os.environ.get("VMC_FAST_GPU_PACK_STEPS", 8))
"""Timed steps per K (after 2 warm-up steps): at K=8 a step is about 8 x 0.2 s on an H200."""
PACK_TIMEOUT = 70
"""Seconds one K may take: process start, building the 1.7 B-parameter UNet, warm-up and timed steps."""
BENCH_PRESET_TIMEOUT = 150
TEST_TIMEOUT = 100
"""Seconds one gpu test may take (pytest-timeout, where installed): a hung NCCL rendezvous must not eat the part."""
"""Seconds one preset may take (fresh process, model build, compilation, warm-up, timed steps)."""
PROBES = {
    "torch": "import torch; assert torch.cuda.is_available(), 'no CUDA device'; v = torch.__version__",
    "triton": "import triton, torch; from vmc_fast.kernels import temporal_attention as f; "
              "x = torch.randn(4, 2, 8, 5, device='cuda'); f(x, x, x); v = triton.__version__",
    "diffusers": "import diffusers; v = diffusers.__version__",
    "deepspeed": "import deepspeed; from deepspeed.accelerator import get_accelerator; "
                 "assert get_accelerator().device_name() == 'cuda', get_accelerator().device_name(); "
                 "v = deepspeed.__version__",
    "bitsandbytes": "import torch, bitsandbytes as bnb; l = bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False)"
                    ".cuda(); l(torch.randn(4, 64, device='cuda', dtype=torch.float16)); v = bnb.__version__",
    "xformers": "import torch, xformers, xformers.ops as xo; x = torch.randn(2, 8, 2, 16, device='cuda', "
                "dtype=torch.bfloat16); xo.memory_efficient_attention(x, x, x); v = xformers.__version__",
    "av": "import av; v = av.__version__",
    "vmc_fast": "import vmc_fast, vmc_fast.cli; v = vmc_fast.__file__",
}
"""One real use of each library on the GPU; `v` is what the summary records."""


@dataclass
class Part:
    name: str
    budget_s: int
    about: str


PARTS = {p.name: p for p in (
    Part("setup", 60, "device, wheels, vmc-fast, probes"),
    Part("tests", 170, "pytest -m gpu"),
    Part("profile", 60, "torch.profiler over 3 steps of fast-eager on show1-base-arch"),
    Part("bench", 240, "vmc-fast bench on show1-base-arch"),
    Part("pack", 180, "vmc-fast bench --pack 1,2,4,8 on show1-base-arch: videos/hour per K (run.sh setup,pack)"),
    Part("toy", 480, "pretrain the toy model within the budget, export it, evaluate it (run alone: run.sh setup,toy)"),
)}


class Runner:
    """Runs parts in order within their budgets, appending to OUT/summary.txt as each ends."""

    def __init__(self, out: Path, dry_run: bool):
        self.out, self.dry_run = out, dry_run
        self.out.mkdir(parents=True, exist_ok=True)
        self.failed = False

    def note(self, line: str) -> None:
        print(line, flush=True)
        with open(self.out / "summary.txt", "a") as handle:
            handle.write(line + "\n")

    def env(self) -> dict:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
               "VMC_FAST_REPORT_FAILURES_AT_ONCE": "1",
               "VMC_FAST_CACHE": "/tmp/vmc-fast-cache", "DS_ACCELERATOR": "cuda"}
        if not self.dry_run:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SITE), env.get("PYTHONPATH")]))
            env["PATH"] = os.pathsep.join([str(SITE / "bin"), env.get("PATH", "")])
        return env

    def run(self, command: list[str], log: Path, budget_s: float, append: bool = False) -> tuple[int | None, float]:
        """Run `command` in its own process group, output to `log`; kill the group after `budget_s` seconds.
        Returns (exit status or None when killed, seconds)."""
        started = time.monotonic()
        with open(log, "a" if append else "w") as handle:
            handle.write(f"$ {shlex.join(command)}\n")
            handle.flush()
            try:
                process = subprocess.Popen(command, cwd=ROOT, env=self.env(), stdout=handle,
                                           stderr=subprocess.STDOUT, start_new_session=True)
            except OSError as exc:  # the program is missing (nvidia-smi on a machine without a driver)
                handle.write(f"[run.py] could not start: {exc}\n")
                return 127, time.monotonic() - started
            try:
                return process.wait(timeout=max(1.0, budget_s)), time.monotonic() - started
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                handle.write(f"\n[run.py] killed after its budget of {budget_s:.0f} s\n")
                return None, time.monotonic() - started


# ------------------------------------------------------------------------------------------------ parts


def part_setup(runner: Runner, budget_s: float) -> tuple[str, str]:
    log = runner.out / "setup.log"
    deadline = time.monotonic() + budget_s
    if runner.dry_run:
        result = wheels.plan(wheels.read_requirements())
        log.write_text(wheels.report(result) + "\n")
        print(wheels.report(result))
        return ("ok", "wheels present and within the carry limit") if result.ok else \
            ("failed", "wheels missing or too large: run benchmarks/gpu/fetch-wheels.sh")
    runner.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm", "--format=csv"],
               log, 20)
    found = sorted(str(p) for p in (ROOT / ".whl").glob("*.whl"))
    install = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--upgrade", "--target", str(SITE)]
    if found:
        status, _ = runner.run(install + found, log, deadline - time.monotonic(), append=True)
        if status != 0:  # one bad wheel must not keep the others out
            for wheel in found:
                runner.run(install + [wheel], log, deadline - time.monotonic(), append=True)
    else:
        with open(log, "a") as handle:
            handle.write("no wheels in .whl/: carry them (benchmarks/gpu/fetch-wheels.sh here, carry ['.whl'])\n")
    status, _ = runner.run(install + ["--no-build-isolation", "."], log, deadline - time.monotonic(), append=True)
    if status != 0:
        _copy_package(log)
    probes = probe_libraries(runner, log, deadline)
    runner.note("libraries: " + json.dumps(probes, sort_keys=True))
    (SITE / "vmc-fast-probes.json").write_text(json.dumps(probes))
    broken = [name for name in ("torch", "diffusers", "vmc_fast") if not probes[name]["ok"]]
    if broken:
        return "failed", f"{', '.join(broken)} unusable; later parts cannot run"
    unusable = [name for name, p in probes.items() if not p["ok"]]
    return "ok", ("unusable, parts needing them skip: " + ", ".join(unusable)) if unusable else "all libraries work"


def _copy_package(log: Path) -> None:
    """Fallback when pip cannot build vmc-fast there: the same layout by hand (kernels/ as vmc_fast.kernels)."""
    import shutil

    with open(log, "a") as handle:
        handle.write("pip could not install vmc-fast; copying vmc_fast/ and kernels/ into the site folder\n")
    shutil.rmtree(SITE / "vmc_fast", ignore_errors=True)
    shutil.copytree(ROOT / "vmc_fast", SITE / "vmc_fast")
    shutil.copytree(ROOT / "kernels", SITE / "vmc_fast" / "kernels")


def probe_libraries(runner: Runner, log: Path, deadline: float) -> dict:
    """{library: {ok, version or error}} from one real use of each, each in a fresh interpreter."""
    results = {}
    for name, code in PROBES.items():
        script = f"{code}\nprint('PROBE-VERSION', v)"
        try:
            done = subprocess.run([sys.executable, "-c", script], cwd="/tmp", env=runner.env(), capture_output=True,
                                  text=True, timeout=max(5.0, min(60.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            results[name] = {"ok": False, "error": "probe timed out"}
            continue
        with open(log, "a") as handle:
            handle.write(f"--- probe {name}: exit {done.returncode}\n{done.stdout}{done.stderr[-4000:]}\n")
        if done.returncode == 0:
            version = done.stdout.rsplit("PROBE-VERSION", 1)[-1].strip()
            results[name] = {"ok": True, "version": version}
        else:
            lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
            results[name] = {"ok": False, "error": lines[-1][:300] if lines else f"exit {done.returncode}"}
    return results


def part_tests(runner: Runner, budget_s: float) -> tuple[str, str]:
    log = runner.out / "tests.log"
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-rA", "-p", "no:cacheprovider", "--durations=0",
               "tests"]
    if os.environ.get("VMC_FAST_GPU_TESTS_K"):  # a rerun of some tests only
        command += ["-k", os.environ["VMC_FAST_GPU_TESTS_K"]]
    if runner.dry_run:
        command = [arg for arg in command if arg != "-v"] + ["--collect-only", "-q"]
    elif importlib.util.find_spec("pytest_timeout") is not None:
        command += [f"--timeout={TEST_TIMEOUT}"]
    status, seconds = runner.run(command, log, budget_s)
    tail = _last_line(log)
    if runner.dry_run:
        count = sum(1 for line in log.read_text().splitlines() if "::" in line)
        ok = status == 0 and count >= 8
        return ("ok" if ok else "failed"), f"{count} gpu tests collected"
    if status is None:
        return "timeout", f"killed at {seconds:.0f} s; {tail}"
    return ("ok" if status == 0 else "failed"), tail


def part_profile(runner: Runner, budget_s: float) -> tuple[str, str]:
    log = runner.out / "profile.log"
    command = [sys.executable, "-m", "vmc_fast.cli", "bench", "--model", "show1-base-arch", "--presets",
               PROFILED_PRESET, "--steps", "5", "--warmup", "2", "--results", "/tmp/vmc-fast-profile-records",
               "--profile", str(runner.out)]
    if runner.dry_run:
        return _check_bench_command(runner, command, [PROFILED_PRESET], log)
    status, seconds = runner.run(command, log, budget_s)
    table = runner.out / f"profile-{PROFILED_PRESET}.txt"
    if status is None:
        return "timeout", f"killed at {seconds:.0f} s"
    if status != 0 or not table.is_file():
        return "failed", _last_line(log)
    return "ok", table.read_text().splitlines()[0].lstrip("# ")


def part_bench(runner: Runner, budget_s: float) -> tuple[str, str]:
    log = runner.out / "bench.log"
    presets = [p for p in os.environ.get("VMC_FAST_GPU_BENCH_PRESETS", ",".join(BENCH_PRESETS)).split(",") if p]
    command = [sys.executable, "-m", "vmc_fast.cli", "bench", "--model", "show1-base-arch", "--presets",
               ",".join(presets), "--steps", str(BENCH_STEPS), "--warmup", str(BENCH_WARMUP), "--preset-timeout",
               str(BENCH_PRESET_TIMEOUT), "--results", str(runner.out)]
    if runner.dry_run:
        return _check_bench_command(runner, command, presets, log)
    status, seconds = runner.run(command, log, budget_s)
    records = runner.out / "bench-cuda.jsonl"
    done = len(records.read_text().splitlines()) if records.is_file() else 0
    if status is None:
        return "timeout", f"killed at {seconds:.0f} s with {done} of {len(presets)} presets recorded"
    return ("ok" if status == 0 else "failed"), f"{done} of {len(presets)} presets recorded; {_last_line(log)}"


def part_pack(runner: Runner, budget_s: float) -> tuple[str, str]:
    log, results = runner.out / "pack.log", runner.out / "pack"
    sizes = [int(k) for k in PACK_SIZES.split(",") if k]
    command = [sys.executable, "-m", "vmc_fast.cli", "bench", "--model", "show1-base-arch", "--presets",
               PROFILED_PRESET, "--pack", ",".join(map(str, sizes)), "--steps", str(PACK_STEPS), "--warmup", "2",
               "--preset-timeout", str(PACK_TIMEOUT), "--results", str(results)]
    if runner.dry_run:
        return _check_bench_command(runner, command, [PROFILED_PRESET], log)
    status, seconds = runner.run(command, log, budget_s)
    path = results / "bench-cuda.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    rates = ", ".join(f"K={r['pack']} {r['videos_per_hour']:.0f}/h" for r in records)
    if status is None:
        return "timeout", f"killed at {seconds:.0f} s; {rates or 'no K recorded'}"
    return ("ok" if status == 0 else "failed"), f"videos/hour: {rates or 'none'}; {_last_line(log)}"


def _check_bench_command(runner: Runner, command: list[str], presets: list[str], log: Path) -> tuple[str, str]:
    """Dry run: every preset exists and the bench CLI knows every option the part passes."""
    status, _ = runner.run([sys.executable, "-m", "vmc_fast.cli", "bench", "--help"], log, 60)
    help_text = log.read_text()
    options = [arg for arg in command if arg.startswith("--")]
    unknown_options = [o for o in options if o not in help_text]
    from vmc_fast.studies.bench import PRESETS

    unknown = [p for p in presets if p not in PRESETS]
    print("bench command:", shlex.join(command[1:]))
    if status != 0 or unknown or unknown_options:
        return "failed", f"unknown presets {unknown}, options {unknown_options}, help exit {status}"
    return "ok", f"{len(presets)} presets, options {' '.join(options)} accepted"


def _last_line(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


TOY_PRETRAIN = ["--batch-size", "64", "--lr", "5e-4", "--warmup-steps", "200", "--lr-schedule", "cosine",
                "--loss-weighting", "v", "--log-every", "50"]
"""Pretraining settings of the toy part (besides --steps, which the measured rate decides)."""
TOY_EVAL_SECONDS = 150
"""Of the toy part's budget, what the export and the evaluation after pretraining need."""


def part_toy(runner: Runner, budget_s: float) -> tuple[str, str]:
    """Calibrate (30 steps), pretrain for as many steps as fit, export, evaluate; everything into OUT/toy.tar."""
    import tarfile

    log, work = runner.out / "toy.log", Path("/tmp/vmc-fast-toy")
    cli = [sys.executable, "-m", "vmc_fast.cli"]
    pretrain = [*cli, "toy-pretrain", *TOY_PRETRAIN, "--device", "cuda"]
    evaluation = [*cli, "eval", "--model", "toy", "--variants", "no-tuning,cos", "--starts", "inversion,noise",
                  "--device", "cuda", "--out", str(work / "eval")]
    if runner.dry_run:
        checks = [_check_cli_options(runner, [*pretrain, "--out", "x", "--steps", "1", "--export-dir", "y"], log),
                  _check_cli_options(runner, evaluation, runner.out / "toy-eval-help.log")]
        failed = [detail for status, detail in checks if status != "ok"]
        return ("failed", "; ".join(failed)) if failed else ("ok", "; ".join(detail for _, detail in checks))
    deadline = time.monotonic() + budget_s
    calibration = [*pretrain, "--out", str(work / "calibration"), "--steps", "40", "--log-every", "10"]
    status, _ = runner.run(calibration, log, min(120.0, budget_s / 3))
    rate = steps_per_second(log.read_text())
    if status != 0 or rate is None:
        return "failed", f"calibration did not run: {_last_line(log)}"
    train_s = deadline - time.monotonic() - TOY_EVAL_SECONDS
    steps = max(100, int(rate * train_s) // 100 * 100)
    run_dir, export_dir, eval_dir = work / "run", work / "weights", work / "eval"
    command = [*pretrain, "--out", str(run_dir), "--steps", str(steps), "--checkpoint-every", "200", "--export",
               "--export-dir", str(export_dir)]
    status, seconds = runner.run(command, log, train_s + 30, append=True)
    if status != 0:  # cut short: ship the last checkpoint (its README says how many steps it reached)
        runner.run([*cli, "toy-pretrain", "--out", str(run_dir), "--export-only", "--export-dir", str(export_dir)],
                   log, 60, append=True)
    os.environ["VMC_FAST_TOY_DIR"] = str(export_dir)  # runner.env() copies os.environ for the eval
    runner.run(evaluation, log, max(30.0, deadline - time.monotonic() - 10), append=True)
    with tarfile.open(runner.out / "toy.tar", "w") as tar:
        for path in (export_dir, eval_dir, log):
            if path.exists():
                tar.add(path, arcname=path.name)
    return ("ok" if (eval_dir / "eval.md").is_file() else "failed"), \
        f"{steps} steps planned at {rate:.2f} steps/s; pretraining {'finished' if status == 0 else 'cut'}"


def steps_per_second(log_text: str) -> float | None:
    """The rate of the last progress line of `vmc-fast toy-pretrain` ("... 12.345 steps/s ..."), or None."""
    rates = [float(line.split(" steps/s")[0].split()[-1]) for line in log_text.splitlines() if " steps/s" in line]
    return rates[-1] if rates else None


def _check_cli_options(runner: Runner, command: list[str], log: Path) -> tuple[str, str]:
    """Dry run: the command's options exist (its --help lists them)."""
    name = command[3]
    status, _ = runner.run([*command[:4], "--help"], log, 60)
    help_text = log.read_text()
    unknown = [arg for arg in command[4:] if arg.startswith("--") and arg not in help_text]
    if status != 0 or unknown:
        return "failed", f"vmc-fast {name}: unknown options {unknown}, help exit {status}"
    return "ok", f"vmc-fast {name} accepts {' '.join(a for a in command[4:] if a.startswith('--'))}"


PART_FUNCTIONS = {"setup": part_setup, "tests": part_tests, "profile": part_profile, "bench": part_bench,
                  "pack": part_pack, "toy": part_toy}
DEFAULT_PARTS = ("setup", "tests", "profile", "bench")
"""What `run.sh` runs without PARTS (they fill one 10-minute command); `pack` and `toy` run as `setup,pack` and
`setup,toy`."""


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="benchmarks/gpu/run.sh", description=__doc__.split("\n\n")[0],
        epilog="examples:\n  bash benchmarks/gpu/run.sh --dry-run            # on the CPU, before a slot\n"
               "  bash benchmarks/gpu/run.sh --out $OUT           # on the GPU machine: every part\n"
               "  bash benchmarks/gpu/run.sh setup,bench --out $OUT --budget bench=300",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", nargs="*", help=f"comma- or space-separated parts (default: "
                                                 f"{', '.join(DEFAULT_PARTS)}; also: pack, toy): {', '.join(PARTS)}")
    parser.add_argument("--out", type=Path, default=None, help="folder for the results (default: $OUT, else "
                                                                "benchmarks/gpu/out)")
    parser.add_argument("--dry-run", action="store_true", help="check everything a CPU can check; run nothing "
                                                               "on a GPU")
    parser.add_argument("--budget", action="append", default=[], metavar="PART=SECONDS",
                        help="override one part's time budget")
    args = parser.parse_args(argv)
    names = [n for arg in args.parts for n in arg.split(",") if n] or list(DEFAULT_PARTS)
    unknown = [n for n in names if n not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    args.parts = [n for n in PARTS if n in names]
    args.budgets = {name: part.budget_s for name, part in PARTS.items()}
    for item in args.budget:
        name, _, seconds = item.partition("=")
        if name not in PARTS or not seconds.isdigit():
            parser.error(f"--budget {item!r}: expected PART=SECONDS with PART one of {', '.join(PARTS)}")
        args.budgets[name] = int(seconds)
    default_out = os.environ.get("OUT") or str(HERE / "out")
    args.out = args.out or Path(default_out)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runner = Runner(args.out.resolve(), args.dry_run)
    started = time.monotonic()
    runner.note(f"# benchmarks/gpu/run.sh {'--dry-run ' if args.dry_run else ''}{','.join(args.parts)} "
                f"({time.strftime('%Y-%m-%d %H:%M:%S %Z')}, git {_git_sha()}); budgets "
                + ", ".join(f"{p} {args.budgets[p]} s" for p in args.parts))
    for name in args.parts:
        part_started = time.monotonic()
        try:
            status, detail = PART_FUNCTIONS[name](runner, args.budgets[name])
        except Exception as exc:  # a broken part must not stop the next one
            status, detail = "failed", f"{type(exc).__name__}: {exc}"
        runner.failed |= status != "ok"
        runner.note(f"{name}: {status} in {time.monotonic() - part_started:.0f} s: {detail}")
    runner.note(f"total {time.monotonic() - started:.0f} s")
    if args.dry_run:
        print("\nOn a GPU slot, one call of the device tool:\n"
              "  run(command='bash benchmarks/gpu/run.sh --out $OUT', carry=['.whl'], timeout_s=600)\n"
              f"carry: .whl ({len(list((ROOT / '.whl').glob('*.whl')))} wheels); results come back from $OUT")
    return 1 if runner.failed else 0


def _git_sha() -> str:
    if os.environ.get("VMC_FAST_GIT_SHA"):  # the GPU machine may receive a stale .git, or none
        return os.environ["VMC_FAST_GIT_SHA"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
