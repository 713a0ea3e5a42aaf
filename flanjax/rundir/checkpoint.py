"""Orbax checkpoints of a trained state plus the data stream's position.

Layout: `<model_dir>/checkpoints/<step>/{state,data,meta}`. The state is named (`model`,
`optimizer`, and whatever else a trainer keeps, e.g. PPO's `value`), so any reader finds the
model under `model/`; `meta` records the layout's `FORMAT_VERSION`. Orbax writes each step
into a temporary directory and renames it only once complete, so a run killed in the middle
of a save leaves no step that a later run could mistake for a good one; the leftovers are
removed when the next run opens the directory.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from flanjax import paths
from flanjax.errors import FlanjaxError
from flanjax.models import stacking
from flanjax.sharding import filled


class CheckpointMismatchError(FlanjaxError, ValueError):
    """A checkpoint whose parameters do not fit the model being trained."""


class CheckpointNotFoundError(FlanjaxError, FileNotFoundError):
    pass


# 1: the state was a tuple, saved under "0", "1", ... (the model first); 2: named fields.
FORMAT_VERSION = 2


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 1000
    keep: int | None = 3  # None keeps all
    async_save: bool = True


def _pure(tree: Any) -> Any:
    """Checkpoints hold plain nested dicts of arrays; NNX states are converted to them."""
    return nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree


def _stacked(saved: Mapping[str, Any]) -> bool:
    """Whether a checkpoint's layers are stacked (a scanned model wrote it), from its flat names."""
    return not any(re.search(r"(^|/)layers/\d+/", name) for name in saved)


def _flat(tree: Any) -> dict[str, Any]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): v for path, v in leaves}


class Checkpointer:
    def __init__(self, model_dir: str, config: CheckpointConfig = CheckpointConfig(), read_only: bool = False):
        """`read_only` (evaluation): never creates, deletes or cleans up anything, so it is safe
        beside a run that is still training and saving."""
        self.directory = paths.abspath(os.path.join(model_dir, "checkpoints"))  # Orbax reads gs:// itself
        self.config = config
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=config.keep,
                enable_async_checkpointing=config.async_save,
                cleanup_tmp_directories=not read_only,
                create=not read_only,
                read_only=read_only,
            ),
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": ocp.JsonCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: Mapping | None = None) -> None:
        """Starts an (asynchronous) save; call `wait()` before relying on it."""
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_pure(state)),
                data=ocp.args.JsonSave(dict(data_state or {})),
                meta=ocp.args.JsonSave({"format_version": FORMAT_VERSION}),
            ),
            force=True,
        )

    def format_version(self, step: int) -> int:
        if not paths.isdir(os.path.join(self.directory, str(step), "meta")):
            return 1  # written before the version was recorded
        return int(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]["format_version"])

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restores straight into the shardings carried by `abstract_state`'s leaves."""
        version = self.format_version(step)
        if version != FORMAT_VERSION:
            raise CheckpointMismatchError(
                f"checkpoint {os.path.join(self.directory, str(step))} has format version {version}, but "
                f"this flanjax resumes only version {FORMAT_VERSION} (a named state: model, optimizer, ...). "
                "Its model can still be read: start a fresh model_dir from it with init_checkpoint, or "
                "evaluate or convert it."
            )
        target = _pure(abstract_state)
        saved = self._saved(step)
        saved_stacked = _stacked(saved)
        if stacking.is_stacked(target) not in (None, saved_stacked):
            raise CheckpointMismatchError(
                f"checkpoint {os.path.join(self.directory, str(step))} holds its layers "
                f"{'stacked' if saved_stacked else 'unrolled'} but this run's model has scan_layers="
                f"{not saved_stacked}: resume with --gin.TransformerConfig.scan_layers={saved_stacked}, or "
                "start a new model_dir from it with init_checkpoint (weights convert between the layouts)."
            )
        self.check_compatible(step, target, saved)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target),
                data=ocp.args.JsonRestore(),
            ),
        )
        state = restored["state"]
        if isinstance(abstract_state, nnx.State):
            state = filled(abstract_state, state)
        return state, dict(restored["data"] or {})

    def restore_model(self, step: int, abstract_model: Any) -> Any:
        """Only the model's state (the saved state's `model`), straight into `abstract_model`'s
        shardings: for evaluation, no optimizer state read. Reads format versions 1 and 2."""
        key = "model" if self.format_version(step) == FORMAT_VERSION else 0
        wanted = _pure(abstract_model)
        saved = self._saved(step)
        # A scanned model reads an unrolled run's layers and the other way round (`stacking`).
        target = {key: stacking.in_layout(wanted, _stacked(saved))}
        self.check_compatible(step, target, saved)
        restored = ocp.PyTreeCheckpointer().restore(
            os.path.join(self.directory, str(step), "state"),
            args=ocp.args.PyTreeRestore(
                item=target,
                restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=True,
            ),
        )
        return filled(abstract_model, stacking.relayout(restored[key], wanted))

    def _saved(self, step: int) -> dict[str, Any]:
        return _flat(self.manager.item_metadata(step)["state"])

    def check_compatible(self, step: int, target: Any, saved: dict[str, Any] | None = None) -> None:
        """Names the first parameter whose shape (or presence) differs from the model's, within
        the parts of the saved state that `target` covers (`saved`: the step's metadata, if read)."""
        saved = self._saved(step) if saved is None else saved
        wanted = _flat(target)
        where = os.path.join(self.directory, str(step))
        for name, leaf in wanted.items():
            if name not in saved:
                raise CheckpointMismatchError(
                    f"checkpoint {where} has no parameter {name}: it was written by a different "
                    "model. Use a fresh model_dir, or the model config the checkpoint was trained with."
                )
            shape = tuple(getattr(saved[name], "shape", ()) or ())
            if shape != tuple(leaf.shape):
                raise CheckpointMismatchError(
                    f"checkpoint {where}: parameter {name} has shape {shape} but the model "
                    f"expects {tuple(leaf.shape)}. The checkpoint was written by a model of "
                    "another shape; use a fresh model_dir or the matching model gin file."
                )
        parts = {name.split("/")[0] for name in wanted}
        extra = sorted(name for name in set(saved) - set(wanted) if name.split("/")[0] in parts)
        if extra:
            raise CheckpointMismatchError(
                f"checkpoint {where} has parameters the model lacks, e.g. {extra[0]}: it was "
                "written by a different model."
            )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
