"""Writes that a reader sees whole or not at all (a folder or a JSON file appears by one rename),
and weights copied into place by hard link where the disk allows.

A build killed at any moment leaves a hidden `.NAME.*` temporary beside the target and never a
half-written target; the builder sweeps those temporaries away at its next start.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_dir(target: Path, *, keep_existing: bool = False) -> Iterator[Path]:
    """Yield an empty hidden folder beside `target`; when the block ends without error it becomes
    `target` (replacing an older one), else it is removed. With `keep_existing`, a `target` that
    another process completed meanwhile wins and the new copy is dropped."""
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield work
        os.chmod(work, 0o755)  # mkdtemp makes it owner-only; a served model is shared
        if target.exists() and not keep_existing:
            shutil.rmtree(target)
        try:
            os.replace(work, target)
        except OSError:
            if not (keep_existing and target.exists()):
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """Yield a hidden path beside `target` for a writer that takes a file name (a C library, say);
    when the block ends without error and the file exists it becomes `target`, else it is removed."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def write_json(path: Path, data: dict) -> None:
    """Write `data` to `path` through a temporary file and one rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, ensure_ascii=False)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; reports and manifests are shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt")


def copy_model_files(source: Path, target: Path, skip: tuple[str, ...] = ()) -> None:
    """A model folder's files other than its weights (tokenizer, config, templates) copied into
    `target`, except the names in `skip`: for a folder whose weights are written anew."""
    for item in Path(source).iterdir():
        if item.is_file() and item.suffix not in WEIGHT_SUFFIXES and item.name not in skip:
            shutil.copyfile(item, target / item.name)


def link_or_copy(src: str, dst: str) -> None:
    """A `copy_function` for shutil.copytree: multi-GB weights cost nothing to hard-link on the
    same disk; elsewhere they are copied."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
