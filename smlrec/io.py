"""Saving and loading model state: safetensors weights, JSON metadata, sha256 manifests.

Everything goes through fsspec, so a state directory may be a local folder or an object
store URI. Files are written to a temporary name and moved into place, so a reader sees
the old file or the new one, never half of either. Loading verifies checksums before
anything is deserialised, and weights are read with safetensors: nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable
from typing import Any

import fsspec
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from smlrec.errors import IntegrityError, StorageError
from smlrec.faults import failpoint

MANIFEST = "manifest.json"


def url_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the path inside it for a local path or fsspec URL (``s3://``...),
    without a listings cache.

    Other processes (the pipeline's tasks, other pods, the service) write the same stores.
    An object store's filesystem (s3fs, gcsfs) with its default cache answers later
    listings and ``exists()`` from the first listing it made, for the life of the process: a
    new period, bundle or lock is not seen, and a rewritten pointer fails to open
    (``FileExpired``). Every store module opens its filesystem here."""
    return fsspec.core.url_to_fs(str(url), use_listings_cache=False)



def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


TMP_PREFIX = ".tmp-"


def atomic_write(fs: fsspec.AbstractFileSystem, path: str,
                 write: Callable[[Any], object]) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, then move it onto ``path``;
    a failure leaves the old file (or none) and no temporary behind. A storage failure (disk
    full, read-only, permissions) raises :class:`StorageError` naming the file."""
    folder, _, name = path.rpartition("/")
    tmp = f"{folder}/{TMP_PREFIX}{uuid.uuid4().hex}-{name}" if folder else \
        f"{TMP_PREFIX}{uuid.uuid4().hex}-{name}"
    try:
        failpoint("write.open", path)
        if folder:
            fs.makedirs(folder, exist_ok=True)
        with fs.open(tmp, "wb") as fh:
            write(fh)
        failpoint("write.before_rename", path)
        fs.mv(tmp, path)
    except OSError as exc:
        raise StorageError(f"{path}: could not be written ({exc.strerror or exc}); the "
                           "previous version, if any, is unchanged") from exc
    finally:
        try:
            if fs.exists(tmp):
                fs.rm(tmp)
        except OSError:
            pass  # the store is failing; the temporary is invisible to readers anyway


def write_bytes_atomic(url: str, data: bytes) -> str:
    """Write ``data`` to ``url`` atomically (see ``atomic_write``). Returns its sha256."""
    fs, path = url_fs(url)

    def write(fh: Any) -> None:
        half = len(data) // 2
        fh.write(data[:half])
        fh.flush()
        failpoint("write.partial", path)
        fh.write(data[half:])

    atomic_write(fs, path, write)
    return sha256_bytes(data)


def read_bytes(url: str) -> bytes:
    fs, path = url_fs(url)
    with fs.open(path, "rb") as fh:
        return fh.read()


def write_json_atomic(url: str, obj: Any) -> str:
    return write_bytes_atomic(url, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(url: str) -> Any:
    return json.loads(read_bytes(url))


def save_bundle(url: str, tensors: dict[str, torch.Tensor], metadata: dict[str, Any],
                extra_files: dict[str, bytes] | None = None) -> dict[str, str]:
    """Save a model bundle into the folder ``url``.

    Writes ``weights.safetensors`` (tensors, moved to CPU and made contiguous),
    ``metadata.json``, any ``extra_files`` (e.g. vocabularies), and last
    ``manifest.json`` with the sha256 of every file: a bundle without a manifest is
    incomplete and is never loaded.
    """
    base = str(url).rstrip("/")
    cpu, seen = {}, set()
    for k, v in tensors.items():
        t = v.detach().to("cpu").contiguous()
        if t.numel() and t.untyped_storage().data_ptr() in seen:
            t = t.clone()  # safetensors refuses shared storage (e.g. a served table = W)
        seen.add(t.untyped_storage().data_ptr())
        cpu[k] = t
    files = {"weights.safetensors": st_save(cpu),
             "metadata.json": (json.dumps(metadata, indent=2, sort_keys=True) + "\n").encode()}
    files.update(extra_files or {})
    sums = {name: write_bytes_atomic(f"{base}/{name}", data) for name, data in files.items()}
    write_json_atomic(f"{base}/{MANIFEST}", {"files": sums})
    return sums


def verify_bundle(url: str) -> dict[str, bytes]:
    """Read every file of a bundle and check it against the manifest. Returns the bytes."""
    base = str(url).rstrip("/")
    try:
        manifest = read_json(f"{base}/{MANIFEST}")
    except FileNotFoundError as exc:
        raise IntegrityError(f"{base}: no {MANIFEST}; the bundle is incomplete") from exc
    out = {}
    for name, expected in manifest["files"].items():
        try:
            data = read_bytes(f"{base}/{name}")
        except FileNotFoundError as exc:
            raise IntegrityError(f"{base}/{name}: listed in the manifest but missing") from exc
        actual = sha256_bytes(data)
        if actual != expected:
            raise IntegrityError(f"{base}/{name}: checksum mismatch (expected {expected[:12]}…, "
                                 f"found {actual[:12]}…); refusing to load")
        out[name] = data
    return out


def load_bundle(url: str, device: torch.device | str = "cpu"
                ) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, bytes]]:
    """Load (tensors, metadata, all files' bytes) after verifying every checksum."""
    files = verify_bundle(url)
    tensors = {k: v.to(device) for k, v in st_load(files["weights.safetensors"]).items()}
    return tensors, json.loads(files["metadata.json"]), files
