"""Where a model's weights go: one device, or split by accelerate when it needs more than one GPU holds."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

__all__ = ["FIT_MARGIN", "Placement", "choose_placement", "folder_parameter_count", "gpu_free_bytes",
           "input_device", "parse_max_memory"]

# Weights alone are not the whole footprint (activations, the key/value cache, CUDA's own context): a model
# is placed on one GPU only when its weights take at most this share of the GPU's free memory.
FIT_MARGIN = 0.8
_MEMORY = re.compile(r"\s*(?P<amount>\d+(?:\.\d+)?)\s*(?P<unit>[KMGT]i?B|B)?\s*", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
# A budget under 1 MiB or over 1 PiB per device is a typo, not a plan.
_MIN_BUDGET, _MAX_BUDGET = 2**20, 2**50


@dataclass(frozen=True)
class Placement:
    """How to load a model: on `device` whole (device_map None), or spread by accelerate's device_map."""

    device: str
    device_map: str | dict[str, Any] | None = None
    max_memory: dict[int | str, int] | None = None

    @property
    def split(self) -> bool:
        return self.device_map is not None


def parse_max_memory(text: str | None) -> dict[int | str, int] | None:
    """`0=20GiB,1=20GiB,cpu=64GiB` as accelerate's max_memory (GPU index or cpu → bytes); bad parts named."""
    if text is None or not text.strip():
        return None
    budgets: dict[int | str, int] = {}
    for part in text.split(","):
        device, separator, amount = part.partition("=")
        device = device.strip().lower()
        match = _MEMORY.fullmatch(amount)
        if not separator or not match or not (device.isdigit() or device in ("cpu", "disk")):
            raise ValueError(f"--max-memory part {part.strip()!r} is not DEVICE=AMOUNT: write e.g. "
                             "0=20GiB,1=20GiB,cpu=64GiB (a GPU index, cpu or disk; B, KB, MB, GB, KiB, MiB, GiB)")
        unit = (match["unit"] or "B").lower()
        size = int(float(match["amount"]) * _UNITS[unit])
        if not _MIN_BUDGET <= size <= _MAX_BUDGET:
            raise ValueError(f"--max-memory {device}={amount.strip()} is out of range: use 1MiB to 1PiB per device")
        budgets[int(device) if device.isdigit() else device] = size
    return budgets


def folder_parameter_count(folder: str | os.PathLike[str]) -> int:
    """Parameters in a folder's safetensors files, from their headers alone (no weight is read)."""
    count = 0
    for file in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as weights:
                for key in weights.keys():  # noqa: SIM118 - safe_open handles are not iterable
                    shape = weights.get_slice(key).get_shape()
                    count += int(torch.Size(shape).numel())
        except (SafetensorError, OSError):
            continue  # the load itself reports a broken file, with its name
    return count


def gpu_free_bytes() -> list[int]:
    """Free memory of each visible CUDA GPU, in bytes (empty without CUDA)."""
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.mem_get_info(index)[0] for index in range(torch.cuda.device_count())]


def choose_placement(requested: str, *, weight_bytes: int, gpu_free: Sequence[int],
                     max_memory: Mapping[int | str, int] | None = None) -> Placement:
    """One device unless `auto` sees several GPUs, a model that does not fit one, or a --max-memory budget.

    An explicit device (cpu, cuda:1) is always one device: the user chose it. `auto` on one GPU keeps the
    whole model there when its weights fit with FIT_MARGIN to spare; otherwise accelerate's device_map="auto"
    spreads the layers over every GPU (and CPU memory when they are full), as big-model inference does.
    """
    if requested != "auto":
        if max_memory:
            raise ValueError(f"--max-memory needs --device auto (got --device {requested}): it budgets a model "
                             "spread over several devices")
        return Placement(requested)
    if max_memory:  # a budget is a request to spread, over CPU memory and disk too when there is no GPU
        return Placement("cuda:0" if gpu_free else "cpu", "auto", dict(max_memory))
    if not gpu_free:
        return Placement("cpu")
    if len(gpu_free) > 1 or weight_bytes > FIT_MARGIN * gpu_free[0]:
        return Placement("cuda:0", "auto")
    return Placement("cuda")


def input_device(model: Any) -> torch.device:
    """Where input IDs must go: the input embedding's device, not `model.device`, which a split model lacks.

    A module accelerate offloads keeps its weight on the meta device and names the device it computes on in its hook.
    """
    embeddings = model.get_input_embeddings()
    hook = getattr(embeddings, "_hf_hook", None)
    execution = getattr(hook, "execution_device", None)
    if execution is not None:
        return torch.device(execution if not isinstance(execution, int) else f"cuda:{execution}")
    return embeddings.weight.device
