"""The wheels a GPU slot carries: read `wheels.txt`, download them here, slim them, and check what fits.

The GPU machine reaches no package index, and the device tool carries at most 64 MiB (the repository's files plus
`.whl/`). So the wheels are fetched on this machine for the GPU machine's Python (3.12, x86-64 manylinux), a wheel
is built here where PyPI has only a source archive, bitsandbytes is cut down to the CUDA 13.0 and CPU libraries
that torch 2.11+cu130 loads, and optional wheels are left behind (last listed first) when the total would not fit.

    python3 benchmarks/gpu/wheels.py fetch     # download into .whl/ and report (benchmarks/gpu/fetch-wheels.sh)
    python3 benchmarks/gpu/wheels.py check     # report only: what is there, sizes, what is missing

Exit status: 0 when every required wheel is present and the total fits, 1 otherwise (the report says why).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WHEELS_TXT = Path(__file__).resolve().parent / "wheels.txt"
WHEEL_DIR = ROOT / ".whl"
LEFT_OUT_DIR = ROOT / ".cache" / "wheels-left-out"
"""Where optional wheels that do not fit are moved (ignored by git, never carried)."""
CARRY_LIMIT_BYTES = 64 * 1024 * 1024
"""What the device tool carries in one call: tracked and untracked-not-ignored files plus carried paths."""
GPU_PYTHON = "3.12"
GPU_TORCH = "2.11.0"
"""torch on the GPU machine (device tool KINDS.md, 2026-11): a wheel whose torch requirement excludes it is
reported and left behind."""
PLATFORMS = ("manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_24_x86_64", "manylinux_2_27_x86_64",
             "manylinux_2_28_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64", "manylinux_2_35_x86_64",
             "manylinux1_x86_64")
SLIM = {"bitsandbytes": re.compile(r"libbitsandbytes_(?!cuda130\.so$|cpu\.so$)[^/]*\.(so|dll|dylib)$")}
"""Per package, the member files dropped from its wheel (bitsandbytes: every native library but CUDA 13.0 and
CPU; the GPU machine's torch is built for CUDA 13.0)."""


@dataclass
class Requirement:
    """One line of wheels.txt."""

    name: str
    """Distribution name as written (``pydantic-core``)."""
    version: str
    """Pinned version."""
    required: bool
    """False: left behind when it does not fit."""
    why: str = ""
    """Which parts need it."""

    @property
    def key(self) -> str:
        """Normalised name as wheel file names spell it (``pydantic_core``)."""
        return re.sub(r"[-_.]+", "_", self.name).lower()


@dataclass
class Plan:
    """What would travel."""

    repo_bytes: int
    carried: list[tuple[Requirement, Path]] = field(default_factory=list)
    missing: list[Requirement] = field(default_factory=list)
    left_out: list[tuple[Requirement, str]] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return self.repo_bytes + sum(path.stat().st_size for _, path in self.carried)

    @property
    def ok(self) -> bool:
        required_left = [r for r, _ in self.left_out if r.required]
        return not self.missing and not required_left and self.total_bytes <= CARRY_LIMIT_BYTES


def read_requirements(path: Path = WHEELS_TXT) -> list[Requirement]:
    """Parse wheels.txt: ``name==version  required|optional  why``; ``#`` starts a comment. ValueError on a bad
    line, naming it."""
    requirements = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split(None, 2)
        if len(parts) < 2 or "==" not in parts[0] or parts[1] not in ("required", "optional"):
            raise ValueError(f"{path}:{number}: expected 'name==version required|optional why', got {line!r}")
        name, version = parts[0].split("==", 1)
        requirements.append(Requirement(name, version, parts[1] == "required", parts[2] if len(parts) > 2 else ""))
    return requirements


def find_wheel(req: Requirement, folder: Path) -> Path | None:
    """The wheel of `req` in `folder`, matched by normalised name and exact version."""
    for path in sorted(folder.glob("*.whl")) if folder.is_dir() else ():
        name, version = path.name.split("-")[:2]
        if re.sub(r"[-_.]+", "_", name).lower() == req.key and version == req.version:
            return path
    return None


def repo_bytes(root: Path = ROOT) -> int:
    """Bytes of what the device tool sends besides carried paths: tracked and untracked-not-ignored files."""
    listed = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=root, check=True,
                            capture_output=True).stdout.decode().split("\0")
    return sum((root / name).stat().st_size for name in listed if name and (root / name).is_file())


def torch_mismatch(wheel: Path, torch_version: str = GPU_TORCH) -> str | None:
    """Why `wheel` cannot run with the GPU machine's torch (its Requires-Dist on torch excludes it), else None."""
    from packaging.requirements import Requirement as Spec
    from packaging.version import Version

    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        lines = archive.read(metadata).decode(errors="replace").splitlines()
    for line in lines:
        if line.startswith("Requires-Dist:"):
            spec = Spec(line.split(":", 1)[1].strip())
            if spec.name.lower() == "torch" and spec.marker is None and spec.specifier:
                if Version(torch_version) not in spec.specifier:
                    return f"needs torch {spec.specifier}, the GPU machine has {torch_version}"
    return None


def plan(requirements: list[Requirement], folder: Path = WHEEL_DIR, root: Path = ROOT) -> Plan:
    """Which wheels travel: all present ones that match the GPU torch, minus optional ones (last first) until
    the repository plus the wheels fit in CARRY_LIMIT_BYTES."""
    result = Plan(repo_bytes=repo_bytes(root))
    for req in requirements:
        wheel = find_wheel(req, folder)
        if wheel is None:
            result.missing.append(req)
        elif (reason := torch_mismatch(wheel)) is not None:
            result.left_out.append((req, reason))
        else:
            result.carried.append((req, wheel))
    for req, wheel in reversed(list(result.carried)):
        if result.total_bytes <= CARRY_LIMIT_BYTES:
            break
        if not req.required:
            result.carried.remove((req, wheel))
            result.left_out.append((req, f"does not fit: {_mib(wheel.stat().st_size)} over the 64 MiB carry"))
    return result


def fetch(requirements: list[Requirement], folder: Path = WHEEL_DIR) -> None:
    """Download every missing wheel (binary for the GPU machine; built here from the source archive where PyPI
    has none), then slim the ones SLIM names."""
    folder.mkdir(parents=True, exist_ok=True)
    for req in requirements:
        if find_wheel(req, folder) is None:
            _download(req, folder)
        wheel = find_wheel(req, folder)
        if wheel is not None and req.key in SLIM:
            slim_wheel(wheel, SLIM[req.key])


def _download(req: Requirement, folder: Path) -> None:
    spec = f"{req.name}=={req.version}"
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    binary = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
              GPU_PYTHON, "--implementation", "cp", *platforms, "-d", str(folder), spec]
    if subprocess.run(binary).returncode == 0:
        return
    print(f"{spec}: no binary wheel for Python {GPU_PYTHON} on x86-64 manylinux; building one from the source "
          f"archive (pure Python only; a compiled wheel built here would not match the GPU machine)")
    with tempfile.TemporaryDirectory() as tmp:
        built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                                "-w", tmp, spec], env={**os.environ, "DS_BUILD_OPS": "0"})
        for wheel in Path(tmp).glob("*.whl"):
            if built.returncode == 0 and wheel.name.endswith("-none-any.whl"):
                shutil.move(str(wheel), folder / wheel.name)
            else:
                print(f"{spec}: the wheel built here is {wheel.name}, not pure Python: not carried")


def slim_wheel(wheel: Path, drop: re.Pattern) -> int:
    """Rewrite `wheel` without the members `drop` matches (and their RECORD lines); returns bytes saved."""
    before = wheel.stat().st_size
    with zipfile.ZipFile(wheel) as archive:
        dropped = [n for n in archive.namelist() if drop.search(n)]
        if not dropped:
            return 0
        tmp = wheel.with_suffix(".tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
            for info in archive.infolist():
                if info.filename in dropped:
                    continue
                data = archive.read(info)
                if info.filename.endswith(".dist-info/RECORD"):
                    data = "".join(line + "\n" for line in data.decode().splitlines()
                                   if line.split(",", 1)[0] not in dropped).encode()
                out.writestr(info, data)
    os.replace(tmp, wheel)
    print(f"{wheel.name}: dropped {len(dropped)} native libraries the GPU machine never loads, "
          f"{_mib(before)} -> {_mib(wheel.stat().st_size)}")
    return before - wheel.stat().st_size


def report(result: Plan) -> str:
    lines = [f"repository (tracked + untracked-not-ignored files): {_mib(result.repo_bytes)}"]
    lines += [f"  carry {path.name:<70} {_mib(path.stat().st_size):>9}  ({req.why})" for req, path in result.carried]
    lines += [f"  MISSING {r.name}=={r.version} ({'required' if r.required else 'optional'}; "
              f"run benchmarks/gpu/fetch-wheels.sh)" for r in result.missing]
    lines += [f"  LEFT OUT {r.name}=={r.version}: {why} ({'required' if r.required else 'optional'}: "
              f"{'the run cannot start' if r.required else 'parts that need it skip'})" for r, why in result.left_out]
    lines.append(f"total {_mib(result.total_bytes)} of {_mib(CARRY_LIMIT_BYTES)}: "
                 f"{'fits' if result.total_bytes <= CARRY_LIMIT_BYTES else 'DOES NOT FIT'}")
    return "\n".join(lines)


def move_left_out(result: Plan, folder: Path = WHEEL_DIR) -> None:
    """Move wheels that will not travel out of `folder`, so that carrying it stays under the limit."""
    kept = {path for _, path in result.carried}
    for path in folder.glob("*.whl"):
        if path not in kept:
            LEFT_OUT_DIR.mkdir(parents=True, exist_ok=True)
            shutil.move(str(path), LEFT_OUT_DIR / path.name)
            print(f"moved {path.name} to {LEFT_OUT_DIR.relative_to(ROOT)} (not carried)")


def _mib(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("fetch", "check"))
    parser.add_argument("--wheels", type=Path, default=WHEEL_DIR, help="folder of the wheels (default .whl)")
    args = parser.parse_args(argv)
    requirements = read_requirements()
    if args.command == "fetch":
        fetch(requirements, args.wheels)
    result = plan(requirements, args.wheels)
    if args.command == "fetch":
        move_left_out(result, args.wheels)
    print(report(result))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
