"""Starting a run from a checkpoint (find it, verify it, put the weights into the whole
model), and the run's checkpointer."""

from __future__ import annotations

from pathlib import Path

import torch

from shardwise.checkpoint.manifest import find_checkpoint
from shardwise.checkpoint.state import model_weights
from shardwise.checkpoint.store import Checkpoint, Checkpointer, read_checkpoint
from shardwise.config import Config
from shardwise.config_toml import to_toml
from shardwise.errors import ShardwiseError


def read_resume(cfg: Config) -> Checkpoint | None:
    if not cfg.run.resume:
        return None
    c = cfg.checkpoint
    return read_checkpoint(find_checkpoint(Path(cfg.run.resume)), verify_key=c.verify_key, encrypt_key=c.encrypt_key)


def build_checkpointer(cfg: Config, out_dir: Path | None, group, collect, faults=None) -> Checkpointer | None:
    """What writes `OUT/checkpoints/step-N` every `train.checkpoint_every` steps, signed with
    `checkpoint.sign_key`, the run's config inside; None where the run writes none. `group`:
    the ranks that hold the state; `collect()`: this rank's logical tensors and the meta."""
    t = cfg.train
    if out_dir is None or t.checkpoint_every <= 0:
        return None
    root = out_dir / "checkpoints"
    return Checkpointer(
        root,
        t.checkpoint_every,
        t.steps,
        group,
        collect,
        cfg.checkpoint.sign_key,
        faults,
        config_text=to_toml(cfg, saved=True),
        keep=t.keep_checkpoints,
        encrypt_key=cfg.checkpoint.encrypt_key,
    )


def load_weights(model: torch.nn.Module, checkpoint: Checkpoint) -> None:
    weights = model_weights(checkpoint.tensors)
    have, want = set(weights), set(model.state_dict())
    if have != want:
        missing = sorted(want - have)[:3] or sorted(have - want)[:3]
        raise ShardwiseError(
            "resume", f"{checkpoint.folder} holds another model ({len(have)} tensors, this one {len(want)}; {missing})"
        )
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise ShardwiseError("resume", f"{checkpoint.folder}: {str(e).splitlines()[-1].strip()}") from None


def load_model_file(model: torch.nn.Module, path: Path, key: str = "model.weights") -> None:
    """A model.safetensors' weights into the whole model (before any layout cuts it), or one
    line naming `key` and what does not fit."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise ShardwiseError(key, f"no such file {str(path)!r}")
    try:
        weights = load_file(path)
    except (SafetensorError, OSError) as e:
        raise ShardwiseError(key, f"{path} is not a safetensors file ({e})") from None
    have, want = set(weights), set(model.state_dict())
    if have != want:
        missing = sorted(want - have)[:3] or sorted(have - want)[:3]
        raise ShardwiseError(key, f"{path} holds another model ({len(have)} tensors, this one {len(want)}; {missing})")
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise ShardwiseError(key, f"{path}: {str(e).splitlines()[-1].strip()}") from None
