"""All-or-nothing adapter folders: a save swaps whole directories, a read sees one complete pair.

A save writes every file into a fresh hidden sibling (``.<name>.new-<id>``), renames the old folder aside
(``.<name>.old-<id>``) and the new one in; a kill at any point leaves one complete folder, and the next save or
read finishes what it left. Saves into one parent are serialised with ``flock``; a read opens its files relative
to one directory handle, so it never mixes two saves.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import shutil
import time
import uuid
from pathlib import Path
from typing import IO, Callable, Iterator, Optional

import safetensors.torch
import torch

logger = logging.getLogger(__name__)

DIGEST_KEY = "vera_fx_sha256"  # safetensors metadata: sha256 of the data section (PEFT ignores it)
# Called with the name of each step of a save ("wrote <file>", "new complete", "old aside", "new in",
# "extras moved", "old removed"): the fault tests kill the saving process there.
STEP_HOOKS: list[Callable[[str], None]] = []

_MAX_HEADER = 100_000_000  # safetensors' own limit on the header's length
_HINT = "the file is truncated or corrupted: save the adapter again"


def _step(name: str) -> None:
    for hook in list(STEP_HOOKS):
        hook(name)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    with contextlib.suppress(OSError):
        os.fsync(fd)
    os.close(fd)


@contextlib.contextmanager
def _parent_lock(parent: Path, blocking: bool = True) -> Iterator[bool]:
    """An exclusive ``flock`` on ``parent``; yields whether it is held (True without fcntl: nothing locked)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield True
        return
    fd = os.open(parent, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _siblings(path: Path, kind: str) -> list[Path]:
    prefix = f".{path.name}.{kind}-"
    try:
        return sorted(p for p in path.parent.iterdir() if p.name.startswith(prefix))
    except FileNotFoundError:
        return []


def _move_extras(old: Path, path: Path, keep: set[str]) -> None:
    """Move entries of ``old`` that a save does not write (and ``path`` lacks) into ``path``."""
    for entry in sorted(old.iterdir()):
        if entry.name not in keep and not (path / entry.name).exists():
            os.rename(entry, path / entry.name)


def _recover_locked(path: Path, keep: set[str]) -> None:
    """Finish or discard what killed saves left (the caller holds the parent's lock)."""
    olds, news = _siblings(path, "old"), _siblings(path, "new")
    if not path.exists() and olds:
        if news:  # killed between renaming the old folder aside and the new one in: the new one is complete
            os.rename(news.pop(), path)
        else:  # killed after renaming the new folder away (cannot happen in write_folder): restore the old
            os.rename(olds.pop(), path)
    for old in olds:
        if path.is_dir():
            _move_extras(old, path, keep)
        shutil.rmtree(old, ignore_errors=True)
    for new in news:  # killed while writing: incomplete
        shutil.rmtree(new, ignore_errors=True)
    if olds or news:
        logger.info("%s: cleaned up after %d interrupted save(s)", path, len(olds) + len(news))
        _fsync_dir(path.parent)


def _folder_path(directory: os.PathLike | str) -> Path:
    path = Path(os.path.realpath(directory))  # a symlinked folder: the save swaps its target, the link stays
    if path.is_file():  # one stat: a folder that a save renames meanwhile is no file
        raise ValueError(f"{str(directory)!r} is a file, not an adapter folder: give a folder")
    return path


def write_folder(directory: os.PathLike | str, files: dict[str, bytes]) -> None:
    """Replace the folder's ``files`` all at once; other entries are kept (``directory`` created if missing)."""
    path = _folder_path(directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _parent_lock(path.parent):
        _recover_locked(path, set(files))
        new = path.parent / f".{path.name}.new-{uuid.uuid4().hex}"
        new.mkdir()
        try:
            for name, data in files.items():
                with open(new / name, "xb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                _step(f"wrote {name}")
            _fsync_dir(new)
            _step("new complete")
            _swap(path, new, set(files))
        except BaseException:  # an error or an interrupt (not a kill): put things back as they were
            shutil.rmtree(new, ignore_errors=True)
            _recover_locked(path, set(files))
            raise
        _fsync_dir(path.parent)


def _swap(path: Path, new: Path, keep: set[str]) -> None:
    if not path.exists():
        os.rename(new, path)
        _step("new in")
        return
    old = path.parent / f".{path.name}.old-{uuid.uuid4().hex}"
    os.rename(path, old)
    _step("old aside")
    os.rename(new, path)
    _step("new in")
    _move_extras(old, path, keep)
    _step("extras moved")
    shutil.rmtree(old)
    _step("old removed")


@contextlib.contextmanager
def open_folder(directory: os.PathLike | str, names: tuple[str, ...],
                keep: set[str]) -> Iterator[dict[str, Optional[IO[bytes]]]]:
    """The files ``names`` of one version of the folder, open for reading (None for a missing one); ``keep``: the
    files a complete folder holds (what recovery keeps, and what a read waits for while a save swaps)."""
    path = _folder_path(directory)
    try:  # finish what killed saves left, unless a save holds the lock (it will)
        if path.parent.is_dir():
            with _parent_lock(path.parent, blocking=False) as held:
                if held:
                    _recover_locked(path, keep)
    except OSError as e:  # a read-only location: read what is there
        logger.debug("%s: no recovery (%s)", path, e)
    for attempt in range(8):
        where = path if path.is_dir() else next(iter(_siblings(path, "old")), None)
        if where is None:
            raise ValueError(f"adapter folder {str(directory)!r} does not exist")
        with _open_files(where, names, keep & set(names), set_aside=where != path) as files:
            if files is not None:
                yield files
                return
        if attempt == 7:
            raise ValueError(f"{path}: the folder kept changing while it was read (saves in a loop?); read it again")
        time.sleep(0.001 * 2 ** attempt)  # a save is swapping it: let the swap finish


@contextlib.contextmanager
def _open_files(where: Path, names: tuple[str, ...], required: set[str],
                set_aside: bool) -> Iterator[Optional[dict[str, Optional[IO[bytes]]]]]:
    """``names`` opened relative to one handle of ``where`` (None when missing); None instead when one of
    ``required`` is missing because a save swapped the folder or is deleting ``where``, a folder it set aside."""
    try:
        dir_fd = os.open(where, os.O_RDONLY) if os.open in os.supports_dir_fd else None
    except FileNotFoundError:  # swapped or removed meanwhile
        yield None
        return
    except OSError:
        dir_fd = None
    files: dict[str, Optional[IO[bytes]]] = {}
    try:
        for name in names:
            try:
                fd = os.open(name, os.O_RDONLY, dir_fd=dir_fd) if dir_fd is not None else \
                    os.open(where / name, os.O_RDONLY)
            except FileNotFoundError:
                fd = None
            files[name] = os.fdopen(fd, "rb") if fd is not None else None
        swapped = any(files[n] is None for n in required) and (set_aside or _swapped(where, dir_fd))
        yield None if swapped else files
    finally:
        for f in files.values():
            if f is not None:
                f.close()
        if dir_fd is not None:
            os.close(dir_fd)


def _swapped(where: Path, dir_fd: Optional[int]) -> bool:
    try:
        now = os.stat(where).st_ino
    except FileNotFoundError:
        return True
    return dir_fd is not None and os.fstat(dir_fd).st_ino != now


def serialise(tensors: dict[str, torch.Tensor]) -> bytes:
    """safetensors bytes with PEFT's metadata plus a sha256 of the data section (checked on load)."""
    plain = safetensors.torch.save(tensors, metadata={"format": "pt"})
    n = int.from_bytes(plain[:8], "little")
    digest = hashlib.sha256(plain[8 + n:]).hexdigest()
    out = safetensors.torch.save(tensors, metadata={"format": "pt", DIGEST_KEY: digest})
    m = int.from_bytes(out[:8], "little")
    return out if out[8 + m:] == plain[8 + n:] else plain


def read_safetensors(f: IO[bytes], source: str) -> dict[str, torch.Tensor]:
    """The tensors of an open safetensors file, finite; ValueError naming ``source`` otherwise. The header is
    checked before any data is read (a large garbage file costs no memory), then vera_fx's checksum."""
    size = os.fstat(f.fileno()).st_size
    if size < 8:
        raise ValueError(f"{source} is not a safetensors file ({size} bytes): {_HINT}")
    n = int.from_bytes(f.read(8), "little")
    if n > size - 8:
        raise ValueError(f"{source}: its header claims {n} bytes but the file has {size - 8}: {_HINT}")
    if n > _MAX_HEADER:
        raise ValueError(f"{source}: its header claims {n} bytes, over safetensors' limit of {_MAX_HEADER}: {_HINT}")
    raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{source}: its header is not JSON ({e}): {_HINT}") from e
    data = f.read(size - 8 - n)
    if len(data) != size - 8 - n:
        raise ValueError(f"{source} changed size while it was read: {_HINT}")
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    digest = meta.get(DIGEST_KEY) if isinstance(meta, dict) else None
    if digest is not None and hashlib.sha256(data).hexdigest() != digest:
        raise ValueError(f"{source}: the tensor data does not match its checksum: {_HINT}")
    try:
        tensors = safetensors.torch.load(n.to_bytes(8, "little") + raw + data)
    except Exception as e:  # safetensors raises its own error type; report it as a bad file
        raise ValueError(f"{source} is not a valid safetensors file ({type(e).__name__}: {e}): {_HINT}") from e
    return _finite(tensors, source)


def read_pickle(f: IO[bytes], source: str) -> dict[str, torch.Tensor]:
    """The tensors of an open ``torch.save`` file (PEFT's adapter_model.bin), finite, read with torch's restricted
    unpickler (never running code the file names); ValueError naming ``source`` otherwise."""
    head = f.read(4)
    if not (head == b"PK\x03\x04" or (len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5)):
        raise ValueError(f"{source} is neither a torch.save zip archive nor a pickle (it starts with {head!r}): "
                         f"{_HINT}")
    f.seek(0)
    try:
        loaded = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's text advises weights_only=False: keep only its reason
        text = str(e)
        reason = next((p.strip() for p in text.split("\n\n")[1:] if p.strip()), text[:200]) \
            if isinstance(e, pickle.UnpicklingError) else f"{type(e).__name__}: {text.split('. ')[0][:200]}"
        if "global" in reason.lower():  # the restricted unpickler refused to import a name
            raise ValueError(f"{source} holds something other than tensors, which vera_fx does not load (its "
                             f"pickle could run code: {reason}). Save the adapter with safetensors (PEFT's default, "
                             "safe_serialization=True) from a source you trust") from None
        raise ValueError(f"{source} is not a valid torch.save file ({reason}): {_HINT}") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{source} holds a {type(loaded).__name__}, not a dict of tensors: save the adapter again")
    bad = [f"{k!r}: {type(v).__name__}" for k, v in loaded.items()
           if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{source} is not a dict of str -> tensor ({', '.join(bad[:5])}): save the adapter again")
    return _finite(loaded, source)


def _finite(tensors: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{source}: tensor {key!r} holds NaN or Inf values; an adapter must be finite. Save "
                             "it again from a model whose training did not diverge")
    return tensors
