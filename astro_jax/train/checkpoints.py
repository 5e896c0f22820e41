"""Train-state checkpoints: Orbax CheckpointManager (every N steps and at the end, keep the last K, async).

Each step directory holds the train state (params, optimizer state, step) and the data iterator's state. A save
is written to a temporary directory (`<step>.orbax-checkpoint-tmp`) and renamed when complete, so a kill during a save
leaves the previous step intact (the temporary directory is removed at the next save); a step that fails to restore
(partial or corrupted files) is skipped with a warning, and the one before it is used (when resuming, the broken step
is deleted: the run redoes it).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import jax


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
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
