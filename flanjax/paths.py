"""Paths that name local files or remote ones (gs://, or any scheme `tf.io.gfile` knows, e.g. the
in-memory ram:// the tests use).

A local path goes through `os` and `open` exactly as before; a path with a scheme goes through
`tf.io.gfile`, imported only then (so `flanjax.decode`, which imports models, stays free of
TensorFlow). Orbax checkpoints and TFDS read and write gs:// themselves and do not come here.
Hugging Face tokenizers read only local files: `local_copy` fetches a remote directory into
the local cache, `copytree` uploads one.
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable

from flanjax.errors import FlanjaxError


class UnsupportedPathError(FlanjaxError, ValueError):
    pass


def is_remote(path: str | os.PathLike) -> bool:
    return "://" in os.fspath(path)


def cache_dir() -> str:
    """Where flanjax keeps files it can rebuild or fetch again: $FLANJAX_CACHE, else ~/.cache/flanjax."""
    return os.environ.get("FLANJAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "flanjax"))


def _gfile(path: str):
    """`tf.io.gfile`, once the scheme of `path` is one it can reach (checked without any I/O, so
    a typo'd or unsupported scheme fails here rather than deep inside a read)."""
    scheme = os.fspath(path).split("://", 1)[0]
    if scheme not in _schemes():
        raise UnsupportedPathError(
            f"cannot reach {path}: this TensorFlow has no file system for {scheme}:// (it has "
            f"{', '.join(s + '://' for s in sorted(_schemes()) if s)}). Copy the files to gs:// or a local "
            f"directory, or register a file system for {scheme}:// before flanjax touches it (e.g. for s3:// "
            "`pip install tensorflow-io` and `import tensorflow_io` first)."
        )
    import tensorflow as tf

    return tf.io.gfile


def _schemes() -> set[str]:
    import tensorflow as tf

    return set(tf.io.gfile.get_registered_schemes())  # not cached: importing tensorflow_io adds some


def abspath(path: str) -> str:
    """`os.path.abspath` for a local path; a remote one is already absolute (and `os.path` would mangle it)."""
    return path if is_remote(path) else os.path.abspath(path)


def exists(path: str) -> bool:
    return _gfile(path).exists(path) if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
    return _gfile(path).isdir(path) if is_remote(path) else os.path.isdir(path)


def makedirs(path: str) -> None:
    """Creates `path` and its parents if missing (on GCS, directories are only name prefixes)."""
    _gfile(path).makedirs(path) if is_remote(path) else os.makedirs(path, exist_ok=True)


def remove(path: str) -> None:
    _gfile(path).remove(path) if is_remote(path) else os.remove(path)


def open(path: str, mode: str = "r", **kwargs):  # noqa: A001 - the builtin's remote-aware twin
    """`open(path, mode, **kwargs)` for a local path; a `tf.io.gfile.GFile` (always UTF-8 in text mode,
    so `kwargs` such as encoding or buffering do not apply) for a remote one. On GCS, append mode
    downloads the object and each flush uploads it whole."""
    if not is_remote(path):
        return builtins.open(path, mode, **kwargs)
    gfile = _gfile(path)
    if "r" in mode and not gfile.exists(path):  # else gfile fails only at the first read, and not with an OSError
        raise FileNotFoundError(errno.ENOENT, "No such file", path)
    if "w" in mode and path.startswith("ram://") and gfile.exists(path):
        gfile.remove(path)  # TensorFlow's ram:// opens an existing file for writing without truncating it
    return gfile.GFile(path, mode)


def write_atomic(path: str, data: str | bytes) -> None:
    """Writes the whole of `path` so that readers never see half of it: locally through a staging file
    and a rename; remotely in one upload (a GCS object appears only once whole)."""
    mode = "wb" if isinstance(data, bytes) else "w"
    if is_remote(path):
        with open(path, mode) as f:
            f.write(data)
        return
    staging = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    with builtins.open(staging, mode) as f:
        f.write(data)
    os.replace(staging, path)


def first_json(directories: Iterable[str], name: str) -> dict | None:
    """The JSON file `name` of the first of `directories` that holds one (a run and its
    ancestors record what later runs inherit: dialogue.json, directions.json)."""
    for directory in directories:
        path = os.path.join(directory, name)
        if exists(path):
            with open(path) as f:
                return json.load(f)
    return None


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _files(directory: str) -> list[str]:
    """The files under `directory`, relative to it, sorted (remote: through gfile's walk)."""
    gfile, root = _gfile(directory), directory.rstrip("/")
    found = []
    for parent, _, names in gfile.walk(root):
        sub = parent[len(root):].strip("/")
        found += [f"{sub}/{n}" if sub else n for n in names]
    return sorted(found)


def copytree(src: str, dst: str) -> None:
    """Copies directory `src` into `dst` (created if missing, files of the same name replaced); either may be remote."""
    if not is_remote(src) and not is_remote(dst):
        shutil.copytree(src, dst, dirs_exist_ok=True)
        return
    gfile = _gfile(dst if is_remote(dst) else src)
    for name in _files(src) if is_remote(src) else _local_files(src):
        target = os.path.join(dst, name)
        makedirs(os.path.dirname(target))
        gfile.copy(os.path.join(src, name), target, overwrite=True)


def _local_files(directory: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(parent, n), directory) for parent, _, names in os.walk(directory) for n in names)


def local_copy(path: str) -> str:
    """A local directory holding the files of directory `path`: `path` itself if local, else a copy in
    the cache. The copy is keyed by the path and each file's size and modification time (a remote
    directory that changes is fetched anew), staged and renamed into place, so processes sharing
    a host never read half a copy."""
    if not is_remote(path):
        return path
    if not isdir(path):
        raise FileNotFoundError(f"directory {path} does not exist.")
    stats = {name: _gfile(path).stat(os.path.join(path, name)) for name in _files(path)}
    listing = [(name, s.length, s.mtime_nsec) for name, s in stats.items()]
    key = hashlib.sha1(repr((path.rstrip("/"), listing)).encode()).hexdigest()[:12]
    parent = os.path.join(cache_dir(), "remote")
    target = os.path.join(parent, f"{os.path.basename(path.rstrip('/')) or 'dir'}_{key}")
    if os.path.isdir(target):
        return target
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=".copy-")
    copytree(path, staging)
    try:
        os.rename(staging, target)
    except OSError:  # another process got there first; its copy is identical
        shutil.rmtree(staging, ignore_errors=True)
    return target
