"""The manifest of a checkpoint directory: every file's size and checksum, written before ``COMPLETE``.

``COMPLETE`` proves that a save finished; it cannot prove that the bytes are still the ones written. A disk
that flips a block, a copy cut short, a file replaced by hand: each leaves a directory that looks complete and
resumes into garbage (a flipped block of ``model.safetensors`` trains on with a loss of 66,391). The manifest
records what was written, so a resume can check it before trusting it.

The checksum is xxHash's XXH3-128: this is protection against accidents, not against an adversary, and XXH3
hashes at memory speed (tens of GB/s), so hashing an 8B model's ~130 GB of ZeRO state costs about as much as
reading it once. Work is striped over ranks (``part``), so each rank of a job hashes ``1/world`` of the files.

It lives here, beside the checkpoint layout (:mod:`dlm.modeling.hf_sources`), because everything that reads a
checkpoint (resume, ``dlm export``, ``model.init_from``) may check it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import xxhash

MANIFEST_NAME = "MANIFEST.json"
MANIFEST_VERSION = 1
_CHUNK = 8 << 20


def file_checksum(path: Path) -> str:
    """XXH3-128 of the file's bytes, streamed in 8 MiB chunks (constant memory for any file size)."""
    digest = xxhash.xxh3_128()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_files(directory: Path, skip: tuple[str, ...] = ()) -> list[str]:
    """Every file under ``directory`` as a sorted relative POSIX path, less the top-level names in ``skip``."""
    return sorted(
        path.relative_to(directory).as_posix()
        for path in directory.rglob("*")
        if path.is_file() and path.relative_to(directory).as_posix() not in skip
    )


def checksum_part(directory: Path, names: list[str], part: tuple[int, int] = (0, 1)) -> dict[str, dict[str, Any]]:
    """``{name: {size, xxh3_128}}`` for this rank's stripe ``names[rank::world]`` of the files."""
    rank, world = part
    return {
        name: {"size": (directory / name).stat().st_size, "xxh3_128": file_checksum(directory / name)}
        for name in names[rank::world]
    }


def write_manifest(directory: Path, entries: dict[str, dict[str, Any]], step: int) -> None:
    """Write ``MANIFEST.json`` (via a temp file and ``os.replace``); the caller fsyncs the directory."""
    payload = {
        "version": MANIFEST_VERSION,
        "step": step,
        "committed_at": time.time(),
        "files": dict(sorted(entries.items())),
    }
    tmp = directory / f"{MANIFEST_NAME}.tmp"
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, directory / MANIFEST_NAME)


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The parsed manifest, or None for a checkpoint written before manifests existed.

    An unreadable manifest is returned as an empty one with ``error`` set, so :func:`verify_part` reports it
    like any other damage instead of raising.
    """
    file = directory / MANIFEST_NAME
    if not file.is_file():
        return None
    try:
        payload = json.loads(file.read_text())
        if not isinstance(payload, dict) or not isinstance(payload.get("files"), dict):
            raise ValueError("no files table")
        return payload
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return {"files": {}, "error": f"{MANIFEST_NAME} is unreadable ({type(exc).__name__})"}


def verify_part(directory: Path, manifest: dict[str, Any], part: tuple[int, int] = (0, 1)) -> list[str]:
    """The problems this rank finds in its stripe of the manifest's files: missing, resized or changed.

    Files that are not in the manifest are ignored (a user may leave notes beside a checkpoint); only what was
    written must be intact.
    """
    if "error" in manifest:
        return [manifest["error"]] if part[0] == 0 else []
    rank, world = part
    problems = []
    for name in sorted(manifest["files"])[rank::world]:
        want = manifest["files"][name]
        path = directory / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != want["size"]:
            problems.append(f"{name} has {path.stat().st_size} bytes, {want['size']} were written")
        elif file_checksum(path) != want["xxh3_128"]:
            problems.append(f"{name} differs from what was written (checksum mismatch)")
    return problems


def summarize(problems: list[str]) -> str:
    """The first problem, and how many more: one line however many files are damaged."""
    more = f" and {len(problems) - 1} more" if len(problems) > 1 else ""
    return problems[0] + more
