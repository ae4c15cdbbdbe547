"""Reading PyTorch files (checkpoints, weights, cache entries) safely, with messages that say what the file is.

Every ``.pt``/``.pth`` file finegrain reads goes through :func:`load_tensors`: ``weights_only=True`` always, so
loading never runs pickled code, and every failure becomes a :class:`CheckpointError` that names the file, says
what is wrong with it (empty, text, another format, pickled objects) and what to pass instead. PyTorch's own
hint to retry with ``weights_only=False`` is never repeated: that is exactly what a malicious file wants.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from finegrain.errors import CheckpointError

ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since PyTorch 1.6
PICKLE_PROTOCOLS = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")  # the legacy torch.save format


def _describe(head: bytes) -> str:
    if not head:
        return "it is empty (0 bytes): it was cut off, e.g. by a full disk or an interrupted copy"
    if head.startswith(b"\x89PNG") or head.startswith(b"\xff\xd8"):
        return "it is an image, not a PyTorch file"
    if head.startswith(b"\x08") or b"onnx" in head.lower():
        return "it looks like an ONNX model: pass it where an .onnx file is expected (predict, serve)"
    try:
        head.decode("utf-8")
        return "it is a text file, not a PyTorch file"
    except UnicodeDecodeError:
        return "it is not a PyTorch file (neither torch.save's zip format nor a pickle)"


def load_tensors(path: str | Path, what: str = "checkpoint", fix: str = "pass a file that finegrain wrote") -> object:
    """``torch.load(path, weights_only=True)`` on the CPU; any failure is a :class:`CheckpointError`."""
    path = Path(path)
    fix = fix[0].upper() + fix[1:] + "."
    try:
        with path.open("rb") as f:
            head = f.read(64)
    except OSError as e:
        raise CheckpointError(f"cannot read {what} '{path}': {e.strerror}") from e
    if not (head.startswith(ZIP_MAGIC) or head.startswith(PICKLE_PROTOCOLS)):
        raise CheckpointError(f"cannot use {what} '{path}': {_describe(head)}. {fix}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refused {what} '{path}': it holds Python objects other than tensors and plain values, and loading "
            f"them could run arbitrary code, so finegrain does not. {fix}"
        ) from e
    except Exception as e:  # noqa: BLE001 - truncated zips, bad records ... have no common base
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"cannot read {what} '{path}': the file is damaged or incomplete ({reason}). {fix}"
        ) from e
