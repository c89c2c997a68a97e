"""Our `kernels/` folder must never be importable as a top-level `kernels` package.

Hugging Face publishes a package named `kernels` (transformers 5 requires it); diffusers and transformers probe for
it (`is_kernels_available()`) and then import from it. If our folder shadowed that name they would pick up our code,
so pyproject installs it as `vmc_fast.kernels` (package-dir), the folder hands the name over to Hugging Face's
package when a process started in the repository root reaches it anyway, and these tests keep the probes honest:
they say True exactly when Hugging Face's distribution is installed.

Each check comes with a positive control, so none can pass because the thing it looks for is absent: the shadow
detector is shown to fire when the repository root is on sys.path, and the probes are shown to turn True when a
`kernels` distribution is installed.
"""

import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REPO_KERNELS = (REPO / "kernels").resolve()
PROBES = {"diffusers": ("diffusers.utils", "diffusers.utils.import_utils"),
          "transformers": ("transformers.utils", "transformers.utils.import_utils")}
FIND_SPEC = ("import importlib.util as u; s = u.find_spec('kernels'); "
             "print(s.origin if s else '', *(s.submodule_search_locations or []) if s else [])")
PROBE_BOTH = ("from diffusers.utils import is_kernels_available as d; "
              "from transformers.utils import is_kernels_available as t; print(d(), t())")


def _provided_by_this_repo(locations) -> bool:
    return any(Path(loc).resolve().is_relative_to(REPO_KERNELS) for loc in locations if loc not in ("namespace", ""))


def _spec_locations(spec) -> list[str]:
    return list(spec.submodule_search_locations or []) + ([spec.origin] if spec.origin else [])


def _hf_kernels_installed() -> bool:
    """Whether a `kernels` distribution other than this repository is installed (transformers 5 depends on one)."""
    import importlib.metadata

    try:
        files = importlib.metadata.distribution("kernels").files or []
    except importlib.metadata.PackageNotFoundError:
        return False
    return not any(_provided_by_this_repo([str(f.locate())]) for f in files)


HF_KERNELS = _hf_kernels_installed()
PROBES_SAY = ["True", "True"] if HF_KERNELS else ["False", "False"]


def _python(code: str, cwd: Path, *flags: str, env: dict | None = None) -> str:
    result = subprocess.run([sys.executable, *flags, "-c", code], cwd=cwd, capture_output=True, text=True,
                            check=True, env=env)
    return result.stdout


def test_the_shadow_detector_fires_when_the_repository_root_is_on_the_path():
    """Positive control: `python -c` in the repository root puts the root first on sys.path, and then `import
    kernels` does find our folder, which `_provided_by_this_repo` must recognise."""
    assert _provided_by_this_repo(_python(FIND_SPEC, REPO).split())


def test_top_level_kernels_is_not_this_repository():
    spec = importlib.util.find_spec("kernels")
    if spec is not None:
        on_path = [p for p in sys.path if Path(p or ".").resolve() == REPO_KERNELS.parent]
        assert not _provided_by_this_repo(_spec_locations(spec)), (
            f"`import kernels` resolves to this repository's kernels/ folder ({spec.origin}) because the repository "
            f"root is on sys.path as {on_path} (`python -m pytest` adds the working directory; so does a conftest.py "
            "at the repository root under pytest's default import mode). Run `pytest` or `python -P -m pytest`, or "
            "drop the repository root from sys.path in tests/conftest.py, and import vmc_fast.kernels."
        )


@pytest.mark.parametrize("where", ["outside the checkout", "repository root with -P"])
def test_top_level_kernels_is_not_this_repository_in_a_fresh_interpreter(tmp_path, where):
    """What an installed user sees: a fresh python started outside the checkout (or with -P, which keeps the
    working directory off sys.path)."""
    cwd, flags = (tmp_path, ()) if where == "outside the checkout" else (REPO, ("-P",))
    assert not _provided_by_this_repo(_python(FIND_SPEC, cwd, *flags).split())
    assert _python(PROBE_BOTH, cwd, *flags).split() == PROBES_SAY


def test_our_kernels_are_installed_as_vmc_fast_kernels():
    spec = importlib.util.find_spec("vmc_fast.kernels")
    assert spec is not None and _provided_by_this_repo(_spec_locations(spec))


def _probe(module_names: tuple[str, ...]):
    for module_name in module_names:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if hasattr(module, "is_kernels_available"):
            return module.is_kernels_available
    return None


@pytest.mark.parametrize("library", PROBES)
def test_hf_kernels_probes_say_whether_hugging_faces_package_is_installed(library):
    probe = _probe(PROBES[library])
    assert probe is not None, f"{library} no longer has is_kernels_available in {PROBES[library]}; update this test"
    assert probe() is HF_KERNELS


HAND_OVER = ("import kernels, vmc_fast.kernels as ours; from diffusers import AutoencoderKL; "
             "print(kernels.__file__); print(ours.__file__)")


@pytest.mark.skipif(not HF_KERNELS, reason="Hugging Face's kernels package is not installed")
def test_in_the_repository_root_import_kernels_is_hugging_faces_package():
    """`python -m vmc_fast.cli` or `python -c` in the checkout puts the root on sys.path, where `kernels` finds our
    folder first (the control above); the folder hands the name over, so diffusers' imports from it work and
    vmc_fast.kernels is still ours."""
    hf_file, ours_file = _python(HAND_OVER, REPO).split()
    assert not _provided_by_this_repo([hf_file])
    assert _provided_by_this_repo([ours_file])


def _fake_kernels_distribution(site: Path) -> str:
    """A `kernels` package with distribution metadata, at a version inside transformers' accepted window."""
    from transformers.utils import import_utils

    version = getattr(import_utils, "KERNELS_MIN_VERSION", "0.18.5")
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("")
    info = site / f"kernels-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: kernels\nVersion: {version}\n")
    (info / "top_level.txt").write_text("kernels\n")
    (info / "RECORD").write_text("")
    return version


def test_the_probes_turn_true_when_a_kernels_distribution_is_installed(tmp_path):
    """Positive control of the probe test: the probes can say True, so their False above means something."""
    import os

    site = tmp_path / "site"
    _fake_kernels_distribution(site)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    assert _python(PROBE_BOTH, tmp_path, env=env).split() == ["True", "True"]
