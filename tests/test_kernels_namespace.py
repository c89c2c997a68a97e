"""Our `kernels/` folder must never be importable as a top-level `kernels` package.

Hugging Face publishes a package named `kernels`; diffusers and transformers probe for it (`is_kernels_available()`)
and then import from it. If our folder shadowed that name they would pick up our code, so pyproject installs it as
`vmc_fast.kernels` (package-dir) and these tests keep the probes honest.
"""

import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO_KERNELS = (Path(__file__).resolve().parents[1] / "kernels").resolve()


def _provided_by_this_repo(spec) -> bool:
    locations = list(spec.submodule_search_locations or []) + ([spec.origin] if spec.origin else [])
    return any(Path(loc).resolve().is_relative_to(REPO_KERNELS) for loc in locations if loc not in ("namespace",))


def test_top_level_kernels_is_not_this_repository():
    spec = importlib.util.find_spec("kernels")
    if spec is not None:
        on_path = [p for p in sys.path if Path(p or ".").resolve() == REPO_KERNELS.parent]
        assert not _provided_by_this_repo(spec), (
            f"`import kernels` resolves to this repository's kernels/ folder ({spec.origin}) because the repository "
            f"root is on sys.path as {on_path} (`python -m pytest` adds the working directory; so does a conftest.py "
            "at the repository root under pytest's default import mode). Run `pytest` or `python -P -m pytest`, or "
            "drop the repository root from sys.path in tests/conftest.py, and import vmc_fast.kernels."
        )


def test_top_level_kernels_is_not_this_repository_in_a_fresh_interpreter(tmp_path):
    """What an installed user sees: a fresh python started outside the checkout."""
    code = "import importlib.util as u; s = u.find_spec('kernels'); print(s.origin if s else '', *(s.submodule_search_locations or []) if s else [])"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    for location in result.stdout.split():
        if location != "namespace":
            assert not Path(location).resolve().is_relative_to(REPO_KERNELS), result.stdout


def _probe(module_name: str):
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    return getattr(module, "is_kernels_available", None)


@pytest.mark.parametrize(
    "module_names",
    [("diffusers.utils", "diffusers.utils.import_utils"), ("transformers.utils", "transformers.utils.import_utils")],
    ids=["diffusers", "transformers"],
)
def test_hf_kernels_probes_stay_false(module_names):
    probe = next((p for p in map(_probe, module_names) if p is not None), None)
    if probe is None:
        pytest.skip(f"no is_kernels_available in {module_names}")
    assert probe() is False
