"""Per-step metrics of a run: DIR/NAME/metrics.jsonl for each video (NAME: the stem of its adapters/NAME.safetensors),
one strict-JSON line per optimizer step with ``step``, ``loss``, ``grad_norm``, ``lr`` and ``seconds``.

The file is written as the video is tuned: each line is appended and flushed as its step ends, so a loss curve can be
watched (``tail -f``) and a stopped run keeps the steps it made. A video tuned again (``--retune``, or a resumed
run that restarts it) starts its file afresh. With ``--tensorboard`` the same scalars also go to TensorBoard event
files in DIR/NAME/tensorboard/. Only the process that writes the video's adapter writes its metrics (rank 0 under
ZeRO; each rank its own videos under ``--strategy videos``). The library report reads loss curves back through
`metrics_path` and `read_metrics`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from vmc_fast.errors import VmcError
from vmc_fast.io.files import strict_json
from vmc_fast.tuning.loop import StepStats

METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
FIELDS = ("step", "loss", "grad_norm", "lr", "seconds")
"""The keys of every line."""


def metrics_path(out_dir: str | Path, adapter_name: str) -> Path:
    """DIR/NAME/metrics.jsonl: the per-step metrics of the video whose adapter is DIR/adapters/NAME.safetensors."""
    return Path(out_dir).expanduser() / adapter_name / METRICS


def tensorboard_dir(out_dir: str | Path, adapter_name: str) -> Path:
    """DIR/NAME/tensorboard/: that video's TensorBoard event files (``tensorboard --logdir DIR``)."""
    return metrics_path(out_dir, adapter_name).parent / TENSORBOARD


def read_metrics(path: str | Path) -> list[dict]:
    """The lines of a metrics.jsonl as dicts, in step order; [] when the file does not exist.

    A last line without its newline (a run stopped mid-write) is left out; any other line that is not JSON raises
    ValueError naming the file and line. Values written as null were NaN or inf.
    """
    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_text()
    whole = text[: text.rfind("\n") + 1]  # after the last newline: the step being written when the run stopped
    rows = []
    for number, line in enumerate(whole.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not a JSON line ({exc.msg})") from None
    return rows


def check_tensorboard() -> None:
    """VmcError naming the install when the tensorboard package (which `--tensorboard` writes with) is missing."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise VmcError("--tensorboard: the tensorboard package is not installed; pip install tensorboard "
                       "(or pip install 'vmc-fast[dev]'), or leave out --tensorboard") from None


class MetricsWriter:
    """Writes one video's metrics as it is tuned; call it with each step's StepStats, then `close`.

    Opening starts afresh: an earlier metrics.jsonl (and TensorBoard folder) of the same adapter name is replaced.
    """

    def __init__(self, out_dir: str | Path, adapter_name: str, tensorboard: bool = False):
        self.path = metrics_path(out_dir, adapter_name)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "w")
        self._tensorboard = None
        if tensorboard:
            self._tensorboard = self._open_tensorboard(tensorboard_dir(out_dir, adapter_name))

    @staticmethod
    def _open_tensorboard(folder: Path):
        check_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        shutil.rmtree(folder, ignore_errors=True)  # a retuned video's curve must not overlay the old one
        return SummaryWriter(log_dir=str(folder))

    def __call__(self, stats: StepStats) -> None:
        row = {"step": stats.step, "loss": stats.loss, "grad_norm": stats.grad_norm, "lr": stats.lr,
               "seconds": stats.seconds}
        self._file.write(strict_json(row) + "\n")
        self._file.flush()
        if self._tensorboard is not None:
            for name in ("loss", "grad_norm", "lr"):
                self._tensorboard.add_scalar(name, row[name], global_step=stats.step)

    def close(self) -> None:
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
