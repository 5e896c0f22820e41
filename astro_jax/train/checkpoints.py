"""Train-state checkpoints: Orbax CheckpointManager (every N steps and at the end, keep the last K, async).

Each step directory holds the train state (params, optimizer state, step) and the data iterator's state. A save
is written to a temporary directory (`<step>.orbax-checkpoint-tmp`) and renamed when complete, so a kill during a save
leaves the previous step intact (the temporary directory is removed at the next save); a step that fails to restore
(partial or corrupted files) is skipped with a warning and deleted (the resumed run redoes it), and the one before
it is used.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax

logger = logging.getLogger(__name__)


class Checkpoints:
  """Saves and restores {"state": train state, "data": iterator state} under `directory` (one folder a step)."""

  def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True):
    import orbax.checkpoint as ocp
    self._ocp = ocp
    self.directory = Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
                                           cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, data_state: dict) -> None:
    """Start saving (returns while the write goes on in the background when async)."""
    ocp = self._ocp
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    data=ocp.args.JsonSave(data_state)), force=True)

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
    """(step, state, data state) of the newest step that restores; None when there is none. `abstract_state`:
    ShapeDtypeStructs with shardings (the state is restored straight into them, on any mesh). The newer steps that
    did not restore are deleted: the run redoes them, and Orbax refuses to save a step that exists."""
    from astro_jax.checkpoint import _drop_closed_loop_reports, _storage_cause
    ocp = self._ocp
    _drop_closed_loop_reports()  # a failed read's late tensorstore callbacks: not one traceback each
    found, broken = None, []
    for step in reversed(self.steps()):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        state = jax.block_until_ready(restored["state"])
        found = step, state, dict(restored["data"])
        break
      except Exception as e:  # noqa: BLE001  (whatever a broken step raises: try the one before)
        first = _storage_cause(e) or (str(e).strip().splitlines() or [""])[0][:300]
        logger.warning("checkpoint step %d in %s does not restore (%s: %s); deleting it, trying the previous one",
                       step, self.directory, type(e).__name__, first)
        print(f"warning: checkpoint step {step} in {self.directory} does not restore ({type(e).__name__}: "
              f"{first}); deleting it, trying the previous one", flush=True)
        broken.append(step)
    for step in broken:
      self.manager.delete(step)
    return found

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
