"""Benchmark result files: the numbers plus the exact command, code version and machine that produced them."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from lmstack.atomic import write_text_atomic
from lmstack.errors import LmstackError

_REPO_DIR = Path(__file__).resolve().parent
_RESERVED = ("device", "git_sha", "env", "timestamp")


def _version(package: str) -> str | None:
    """Installed version without importing the package (importing transformers or triton costs seconds)."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str, env: dict[str, str] | None = None) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=_REPO_DIR, capture_output=True, text=True, timeout=10,
                              env=None if env is None else {**os.environ, **env})
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_sha() -> str:
    """HEAD of the lmstack checkout, "-dirty" when tracked files differ from it; "unknown" outside git."""
    sha = _git("rev-parse", "HEAD")
    if not sha:
        return "unknown"
    # Untracked files (results, scratch) do not count, as with `git describe --dirty`.
    changes = _git("status", "--porcelain", "--untracked-files=no")
    return f"{sha}-dirty" if changes else sha


def source_tree() -> str | None:
    """Git tree id of src/ as it is on disk, untracked files included (for the commit that holds this code,
    `git rev-parse COMMIT:src` gives the same id): it names the code that ran where HEAD does not, as in a
    copy of the working tree whose .git is older. Hashed into a scratch object store, so the repository is not
    written to; None outside git."""
    with tempfile.TemporaryDirectory() as scratch:
        objects = os.path.join(scratch, "objects")
        os.mkdir(objects)
        env = {"GIT_INDEX_FILE": os.path.join(scratch, "index"), "GIT_OBJECT_DIRECTORY": objects}
        if _git("add", "-A", "--", ":/src", env=env) is None:
            return None
        return _git("write-tree", "--prefix=src/", env=env)


# The code's identity when this module was first imported (a benchmark imports it as it starts): a run that
# takes an hour must not name the tree as edited while it ran (one such CPU run recorded a later tree).
_AT_START = {"git_sha": git_sha(), "source_tree": source_tree()}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: str | torch.device | None = None) -> str:
    """Human-readable name of the device a benchmark ran on; None means CUDA when available, else CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_name()} ({os.cpu_count()} cores)"


def env_info(device: str | torch.device | None = None) -> dict[str, Any]:
    """Everything needed to tell whether two result files are comparable."""
    return {
        "device": device_name(device),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        **_AT_START,
    }


def _jsonable(obj: Any) -> Any:
    """Fallback for json.dump: numpy/torch scalars become numbers, anything else (paths, dtypes) a string."""
    if hasattr(obj, "item") and callable(obj.item):
        try:
            return obj.item()
        except (TypeError, ValueError, RuntimeError):
            pass
    return str(obj)


def cli_command(subcommand: str, args: Any, options: tuple[str, ...], flags: tuple[str, ...] = ()) -> str:
    """The `lmstack` command that reproduces a run, every option spelled out (sys.argv may be pytest's)."""
    parts = ["lmstack", *subcommand.split()]
    for name in options:
        value = getattr(args, name)
        if value is not None:
            parts += [f"--{name.replace('_', '-')}", str(value)]
    parts += [f"--{name.replace('_', '-')}" for name in flags if getattr(args, name)]
    return shlex.join(parts)


def write_results(
    path: str | Path,
    command: str,
    metrics: dict[str, Any],
    *,
    device: str | torch.device | None = None,
    **extra: Any,
) -> None:
    """Write `{"command", "device", "git_sha", "env", "metrics", **extra, "timestamp"}` as JSON, atomically.

    The file is written next to its destination and renamed over it, so a crash never leaves a half-written
    result that a later plot or comparison would read. `device` is the one the benchmark ran on.
    """
    clash = [k for k in _RESERVED if k in extra]
    if clash:
        raise ValueError(f"write_results computes {', '.join(clash)} itself; rename the extra field(s)")
    env = env_info(device)
    record = {"command": command, "device": env["device"], "git_sha": env["git_sha"], "env": env,
              "metrics": metrics, **extra,
              "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LmstackError(f"cannot create results folder {path.parent}: {e}; choose another path") from None
    write_text_atomic(path, json.dumps(record, indent=2, default=_jsonable) + "\n")


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> None:
    """Save a matplotlib figure as PNG beside `path`, rename it over `path`, and close the figure."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=dpi)
    import matplotlib.pyplot as plt

    plt.close(fig)
    tmp.replace(path)
