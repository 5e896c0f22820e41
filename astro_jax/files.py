"""Writing outputs safely: never replace what exists unless asked, write into temporary siblings and rename,
give files the modes the user's umask gives, and clear what a killed writer left behind.

Temporary siblings are named `.NAME.tmp-<pid>@<host>-<random>` (and `.NAME.old-...` while a directory is swapped,
`.NAME.aside-...` while an overwritten run waits for its replacement's first result), so the next writer of NAME can
tell a dead writer's leftovers from a live one's and remove (or restore) them. A run holds `.NAME.lock` (an OS lock
the kernel releases when the process dies) for as long as it writes NAME.
"""
from __future__ import annotations

import errno
import fcntl
import functools
import json
import os
import re
import secrets
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from astro_jax.errors import UserError


class OutputExistsError(UserError, FileExistsError):
  """The output path exists and overwriting was not asked for."""


class OutputInUseError(UserError):
  """Another live run holds the output location's lock."""


_HOST = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "host"


def _sibling_prefix(out: Path, kind: str) -> str:
  """`.NAME.tmp-<pid>@<host>-` (or `.old-`): the owner of a leftover stays recoverable after a kill."""
  return f".{out.name}.{kind}-{os.getpid()}@{_HOST}-"


def _leftover_owner(out: Path, name: str) -> tuple[str, int, str] | None:
  """(kind, pid, host) when `name` is a temporary sibling of `out`."""
  match = re.fullmatch(rf"\.{re.escape(out.name)}\.(tmp|old|aside)-(\d+)@(.+)-[A-Za-z0-9_]+", name)
  return (match.group(1), int(match.group(2)), match.group(3)) if match else None


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except (OSError, OverflowError):  # PermissionError: another user's live process; odd pids: keep the files
    return True
  return True


def _remove(path: Path) -> None:
  if path.is_dir() and not path.is_symlink():
    shutil.rmtree(path, ignore_errors=True)
  else:
    path.unlink(missing_ok=True)


def _output_path(out: str | os.PathLike) -> Path:
  """`out` as a normalized absolute path that names an entry of a parent directory."""
  path = Path(os.path.abspath(out))
  if not path.name:
    raise UserError(f"cannot write to {out}: name a file or directory to create")
  return path


def remove_stale_leftovers(out: str | os.PathLike) -> list[Path]:
  """Clear temporary siblings of `out` whose writer (on this host) no longer runs, e.g. after a SIGKILL.

  A `.old-` sibling whose writer died between moving `out` aside and moving the new output in is the previous
  output: it is moved back to `out`. An `.aside-` sibling holds a run's entries that a dead overwriting run moved aside
  before its first result: what the dead run wrote under those names is removed and the old entries moved back. Returns what was
  removed or restored.
  """
  out = _output_path(out)
  try:
    entries = sorted(out.parent.iterdir())
  except (FileNotFoundError, NotADirectoryError):
    return []
  handled = []
  for entry in entries:
    owner = _leftover_owner(out, entry.name)
    if owner is None or owner[2] != _HOST or owner[1] == os.getpid() or _pid_alive(owner[1]):
      continue
    if owner[0] == "aside":
      _put_back(entry, out)  # the dead run wrote nothing lasting: its entries go, the old ones come back
    elif owner[0] == "old" and not (out.exists() or out.is_symlink()):
      os.replace(entry, out)
    else:
      _remove(entry)
    handled.append(entry)
  return handled


def prepare_output(out: str | os.PathLike, overwrite: bool = False, *, hint: str = "--overwrite") -> Path:
  """Call before any work: refuses a location where nothing can be written, clears dead writers' leftovers, then
  refuses an existing file or directory at `out` unless `overwrite` (`hint` says how to ask for it)."""
  out = _output_path(out)
  why = unwritable_reason(out)
  if why is not None:
    raise UserError(f"cannot write {out}: {why}")
  remove_stale_leftovers(out)
  if not overwrite and (out.exists() or out.is_symlink()):
    kind = "directory" if out.is_dir() else "file"
    raise OutputExistsError(f"{out} already exists (a {kind}); pass {hint} to replace it")
  return out


def umask() -> int:
  """The process umask, read without changing it (Linux), else once by setting and restoring it."""
  try:
    for line in Path("/proc/self/status").read_text().splitlines():
      if line.startswith("Umask:"):
        return int(line.split()[1], 8)
  except (OSError, ValueError, IndexError):
    pass
  return _umask_fallback()


@functools.cache
def _umask_fallback() -> int:
  old = os.umask(0o077)  # restrictive for the instant it is set
  os.umask(old)
  return old


def apply_umask(root: str | os.PathLike) -> None:
  """Give `root` and everything under it the modes plain mkdir/open give (0777/0666 less the umask): mkdtemp
  makes 0700 directories, and some writers (tempfile, safetensors) make 0600 files."""
  mask = umask()
  modes = {True: 0o777 & ~mask, False: 0o666 & ~mask}
  os.chmod(root, modes[True])
  for base, dirs, files in os.walk(root):
    for name in dirs + files:
      path = os.path.join(base, name)
      if not os.path.islink(path):
        os.chmod(path, modes[name in dirs])


@contextmanager
def atomic_output_dir(out: str | os.PathLike, *, overwrite: bool = False,
                      hint: str = "--overwrite") -> Iterator[Path]:
  """Yield a temporary sibling directory; on success it gets umask modes and becomes `out`.

  An existing `out` is refused unless `overwrite`, and then kept until the new output is complete. On any error
  the temporary directory is removed; if the process is killed, the next write to `out` removes it.
  """
  out = _output_path(out)
  prepare_output(out, overwrite, hint=hint)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=_sibling_prefix(out, "tmp"), dir=out.parent))
  try:
    yield tmp
    apply_umask(tmp)
    prepare_output(out, overwrite, hint=hint)  # nothing appeared meanwhile
    if out.exists() or out.is_symlink():
      old = out.with_name(_sibling_prefix(out, "old") + secrets.token_hex(4))
      os.replace(out, old)
      os.replace(tmp, out)
      _remove(old)
    else:
      os.replace(tmp, out)
  finally:
    if tmp.exists():
      _remove(tmp)


def write_text_atomic(path: str | os.PathLike, text: str | bytes | Iterable[str]) -> None:
  """Write text (or chunks of it, or bytes) to a temporary sibling, fsync, then rename over `path`: `path` is always
  either the old file or the complete new one. The file gets umask modes; dead writers' leftovers are removed first."""
  path = _output_path(path)
  remove_stale_leftovers(path)
  fd, tmp = tempfile.mkstemp(prefix=_sibling_prefix(path, "tmp"), dir=path.parent)
  binary = isinstance(text, bytes)
  try:
    os.fchmod(fd, 0o666 & ~umask())
    with (os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8")) as f:
      for chunk in ([text] if isinstance(text, (str, bytes)) else text):
        f.write(chunk)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise
  fsync_dir(path.parent)


def fsync_dir(directory: str | os.PathLike) -> None:
  """Make a rename or a new file in `directory` durable (where the platform supports it)."""
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


# --- a run's hold of its output location ---------------------------------------------------------------------------

def lock_path(out: str | os.PathLike) -> Path:
  out = _output_path(out)
  return out.with_name(f".{out.name}.lock")


@contextmanager
def output_lock(out: str | os.PathLike) -> Iterator[Path]:
  """Hold the exclusive lock of `out` (`.NAME.lock` beside it, holding `pid@host`) for the duration; another holder
  (a live run, here or, on storage that supports it, on another host) is an OutputInUseError naming it. The kernel
  releases the lock of a killed process; the file is removed when the lock is released."""
  path = lock_path(out)
  path.parent.mkdir(parents=True, exist_ok=True)
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~umask())
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise
      holder = _read_holder(path)
      raise OutputInUseError(f"{_output_path(out)} is in use by another run ({holder}, lock {path}); wait for it "
                             f"to finish or use another output location") from None
    try:
      same = os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
      same = False
    if same:
      break
    os.close(fd)  # the previous holder removed the file between our open and our lock: lock the new one
  try:
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}@{socket.gethostname()}\n".encode())
    yield path
  finally:
    path.unlink(missing_ok=True)  # before the release: a waiting run then locks a fresh file, never this one
    os.close(fd)


def _read_holder(path: Path) -> str:
  try:
    return path.read_text().strip() or "pid unknown"
  except OSError:
    return "pid unknown"


def set_aside(out: str | os.PathLike, names: Iterable[str]) -> Path:
  """Move the entries `names` of directory `out` into an `.aside-` sibling (restored by `put_back`, or by the next
  writer of `out` if this process dies). A manifest written first says which of them existed, so a put-back knows
  which entries at `out` are the old ones and which a new run created."""
  out = _output_path(out)
  names = list(names)
  aside = out.with_name(_sibling_prefix(out, "aside") + secrets.token_hex(4))
  aside.mkdir()
  present = [n for n in names if (out / n).exists() or (out / n).is_symlink()]
  write_text_atomic(aside / _MANIFEST, json.dumps({"names": names, "present": present}))
  for name in present:
    os.replace(out / name, aside / name)
  fsync_dir(out)
  return aside


_MANIFEST = ".set_aside.json"


def drop_aside(aside: Path) -> None:
  """The replacement has its first result: delete the set-aside entries (renamed to a `.tmp-` sibling first, so a
  kill while deleting leaves only a leftover)."""
  out = aside.with_name(_leftover_target(aside))
  trash = out.with_name(_sibling_prefix(out, "tmp") + secrets.token_hex(4))
  os.replace(aside, trash)
  fsync_dir(out.parent)
  _remove(trash)


def put_back(aside: Path) -> Path:
  """Undo `set_aside`: the entries a new run wrote under those names are removed and the old ones moved back."""
  out = aside.with_name(_leftover_target(aside))
  _put_back(aside, out)
  return out


def _leftover_target(sibling: Path) -> str:
  match = re.fullmatch(r"\.(.+)\.(?:tmp|old|aside)-\d+@.+-[A-Za-z0-9_]+", sibling.name)
  if not match:
    raise ValueError(f"{sibling} is not a temporary sibling")
  return match.group(1)


def _put_back(aside: Path, out: Path) -> None:
  try:
    manifest = json.loads((aside / _MANIFEST).read_text())
  except (OSError, ValueError):
    manifest = {"names": [], "present": []}  # killed before anything was moved
  out.mkdir(parents=True, exist_ok=True)
  for name in manifest["names"]:
    old, new = aside / name, out / name
    if name in manifest["present"] and not (old.exists() or old.is_symlink()):
      continue  # never moved, or already moved back
    if new.exists() or new.is_symlink():
      trash = out.with_name(_sibling_prefix(out, "tmp") + secrets.token_hex(4))
      os.replace(new, trash)
      _remove(trash)
    if name in manifest["present"]:
      os.replace(old, new)
  fsync_dir(out)
  _remove(aside)


def unwritable_reason(out: str | os.PathLike, *, directory: bool | None = None) -> str | None:
  """Why `out` (a directory to create or reuse when `directory`, a file when not, None: either) cannot be written,
  or None: a file where a directory is wanted (or the reverse), a parent that is a file, a location where no file can
  be created (read-only file system, no permission: tried by creating and removing a probe file)."""
  out = _output_path(out)
  if out.exists() and directory is not None and directory != out.is_dir():
    return "is a file; name a directory" if directory else "is a directory; name a file"
  probe_dir = out if directory and out.is_dir() else out.parent
  while not probe_dir.exists():
    probe_dir = probe_dir.parent
  if not probe_dir.is_dir():
    return f"{probe_dir} is a file, not a directory"
  try:
    fd, probe = tempfile.mkstemp(prefix=_sibling_prefix(out, "tmp"), dir=probe_dir)
  except OSError as e:
    return f"cannot create files in {probe_dir} ({os.strerror(e.errno) if e.errno else e})"
  os.close(fd)
  os.unlink(probe)
  return None
