"""Train-state checkpoints: Orbax CheckpointManager (every N steps and at the end, keep the last K, async).

Each step directory holds the train state (params, optimizer state, step) and the data iterator's state. A save
is written to a temporary directory (`<step>.orbax-checkpoint-tmp`) and renamed when complete, so a kill during a save
leaves the previous step intact (the temporary directory is removed at the next save); a step that fails to restore
(partial or corrupted files) is skipped with a warning, and the one before it is used (when resuming, the broken step
is deleted: the run redoes it).
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import jax

from astro_jax.errors import UserError


class Checkpoints:
  """Saves and restores {"state": train state, "data": iterator state} under `directory` (one folder a step)."""

  def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True,
               on_first_save: Callable[[], None] | None = None):
    import orbax.checkpoint as ocp
    self._ocp = ocp
    self.directory = Path(directory).absolute()
    self._on_first_save = on_first_save  # runs once the first save of this run is complete
    self._pending: int | None = None  # the step of the last save started
    from astro_jax.checkpoint import drop_closed_loop_reports
    drop_closed_loop_reports()  # a failed write's late tensorstore callbacks: not one traceback each
    _quiet_orbax_errors()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
                                           cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def delete(self, step: int) -> None:
    self.manager.delete(step)

  def save(self, step: int, state: Any, data_state: dict) -> None:
    """Start saving (returns while the write goes on in the background when async, except the run's first save,
    which completes before `on_first_save` runs). A failed save, this one's or an earlier background one's, is a
    CheckpointSaveError naming the step and the free space."""
    ocp = self._ocp
    self.wait()  # the previous save's failure is its own (Orbax would wait for it inside save anyway)
    with self._failures(step):
      self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      data=ocp.args.JsonSave(data_state)), force=True)
    self._pending = step
    if self._on_first_save is not None:
      self.wait()
      callback, self._on_first_save = self._on_first_save, None
      callback()

  def check(self) -> None:
    """Raise CheckpointSaveError if a background save failed (cheap: call every step)."""
    with self._failures(self._pending):
      self.manager.check_for_errors()

  @contextlib.contextmanager
  def _failures(self, step: int | None) -> Iterator[None]:
    """A save's storage failure (disk full, read-only, gone) as one line; anything else keeps its traceback."""
    from astro_jax.checkpoint import storage_cause
    try:
      yield
    except Exception as e:  # noqa: BLE001  (Orbax wraps the OSError of its writer threads)
      cause = _os_error(e) or storage_cause(e)
      if cause is None:
        raise
      raise CheckpointSaveError(f"checkpoint step {step} could not be saved in {self.directory}: {cause} "
                                f"({_free_space(self.directory)}); training stopped, the checkpoints before it are "
                                f"intact") from None

  def restore_latest(self, abstract_state: Any, *, delete_broken: bool = False) -> tuple[int, Any, dict] | None:
    """(step, state, data state) of the newest step that restores; None when there is none. `abstract_state`:
    ShapeDtypeStructs with shardings (the state is restored straight into them, on any mesh). `delete_broken`
    (resuming): delete the newer steps that did not restore, which the run redoes (Orbax refuses to save a step
    that exists, and stale newer steps would make it drop the new ones as the oldest)."""
    from astro_jax.checkpoint import drop_closed_loop_reports, storage_cause
    ocp = self._ocp
    drop_closed_loop_reports()  # a failed read's late tensorstore callbacks: not one traceback each
    found, broken = None, []
    for step in reversed(self.steps()):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        state = jax.block_until_ready(restored["state"])
        found = step, state, dict(restored["data"])
        break
      except Exception as e:  # noqa: BLE001  (whatever a broken step raises: try the one before)
        cause = storage_cause(e) or (str(e).strip().splitlines() or [""])[0][:300]
        what = (f"checkpoint step {step} in {self.directory} does not restore ({type(e).__name__}: {cause}); "
                f"{'deleting it, ' if delete_broken else ''}trying the previous one")
        print(f"warning: {what}", flush=True)
        broken.append(step)
    for step in broken if delete_broken else ():
      self.manager.delete(step)
    return found

  def wait(self) -> None:
    with self._failures(self._pending):
      self.manager.wait_until_finished()
      self.manager.check_for_errors()

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self.manager.close()


def _quiet_orbax_errors() -> None:
  """Orbax logs a failed background save from its threads with tracebacks; the run reports it as one line
  (CheckpointSaveError), so those logs are shown only with --verbose (absl at INFO)."""
  import logging
  absl_logger = logging.getLogger("absl")
  if any(getattr(f, "_astro_orbax", False) for f in absl_logger.filters):
    return

  def keep(record: logging.LogRecord) -> bool:
    return "/orbax/" not in record.pathname or absl_logger.getEffectiveLevel() <= logging.INFO

  keep._astro_orbax = True
  absl_logger.addFilter(keep)


class CheckpointSaveError(UserError):
  """A checkpoint could not be written (disk full, read-only or vanished storage)."""


def _os_error(error: BaseException) -> str | None:
  """`strerror (ERRNO)` of the first OS error in an exception's chain (an OSError, or tensorstore's
  `[os_error_code='N']`), else None."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    code = error.errno if isinstance(error, OSError) else None
    match = re.search(r"os_error_code='(\d+)'", str(error))
    code = code or (int(match.group(1)) if match else None)
    if code:
      return f"{os.strerror(code)} ({errno.errorcode.get(code, code)})"
    error = error.__cause__ or error.__context__
  return None


def _free_space(directory: Path) -> str:
  path = directory
  while not path.exists() and path != path.parent:
    path = path.parent
  try:
    usage = shutil.disk_usage(path)
  except OSError:
    return "free space unknown"
  return f"{usage.free / 2**20:.1f} MiB free of {usage.total / 2**20:.1f} MiB on that file system"
