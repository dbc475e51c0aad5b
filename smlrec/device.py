"""Device selection: CUDA when present, CPU otherwise, chosen automatically."""

from __future__ import annotations

import os

import torch


def pick_device(preference: str | None = None) -> torch.device:
    """Return the device to compute on.

    ``preference`` (or the ``SMLREC_DEVICE`` environment variable) may be ``"auto"``
    (default: CUDA if available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    Asking for CUDA on a machine without it is an error, not a silent fallback.
    """
    pref = (preference or os.environ.get("SMLREC_DEVICE") or "auto").lower()
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(pref)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {pref!r} requested but CUDA is not available on this machine")
    return device


def configure_threads(n: int | None = None) -> int:
    """Set torch's intra-op CPU threads: ``n``, else ``$SMLREC_THREADS``, else 1.

    The models here run many small kernels (batches of a few hundred rows); on a small,
    shared machine extra OpenMP threads spin against each other and were measured 10-40x
    slower than one thread. Large ranking products still vectorise within one thread.
    """
    n = n or int(os.environ.get("SMLREC_THREADS", "1"))
    torch.set_num_threads(max(1, n))
    return torch.get_num_threads()
