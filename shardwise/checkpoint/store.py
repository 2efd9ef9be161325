"""Writing and reading checkpoints: sharded, atomic, verified.

    OUT/checkpoints/step-00000012/
        shard-00000.safetensors   the logical tensors rank 0 was given to write, and its RNG state
        shard-00001.safetensors   ...
        state.json                step, LR schedule, which file holds which tensor
        manifest.json             every file above with its size and SHA-256, written last
        manifest.sig              Ed25519 signature of manifest.json (with checkpoint.sign_key)

The tensors are spread over the ranks that hold them, balanced by bytes, and
every rank writes its file at the same time. Everything goes into
`.tmp-step-N/` first; each file is fsynced, rank 0 writes state.json and the
manifest last, then renames the folder into place and fsyncs its parent. A
folder named step-N therefore always has its manifest; one killed halfway is
still .tmp-step-N and is never read. Only safetensors and JSON are read.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from shardwise.checkpoint.manifest import fsync_path, step_dir, verify, write_manifest
from shardwise.comm.collectives import all_gather_json

STATE = "state.json"


def _fault(faults, point: str) -> None:
    if faults is not None:
        faults.maybe_fail_at(point)


def save_checkpoint(
    root: Path,
    step: int,
    tensors: dict[str, Tensor],
    *,
    meta: dict,
    group: dist.ProcessGroup | None,
    sign_key: str = "",
    faults=None,
) -> Path:
    """Write this rank's share of `tensors` (the logical tensors it holds) as one checkpoint
    of every member of `group`; rank 0 of the group finishes it. Returns its folder."""
    rank = dist.get_rank(group) if group is not None else 0
    held = {k: v.numel() * v.element_size() for k, v in tensors.items() if not k.startswith("rng/")}
    everyone = all_gather_json(held, group)
    owner: dict[str, int] = {}
    load = [0] * len(everyone)
    for name in sorted({k for h in everyone for k in h}):  # the same decision on every rank
        holders = [r for r, h in enumerate(everyone) if name in h]
        writer = min(holders, key=lambda r: (load[r], r))
        owner[name] = writer
        load[writer] += everyone[writer][name]

    tmp, final = root / f".tmp-step-{step:08d}", step_dir(root, step)
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier(group)
    mine = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items() if owner.get(k) == rank}
    mine |= {k: v for k, v in tensors.items() if k.startswith("rng/")}
    from safetensors.torch import save_file

    path = tmp / f"shard-{rank:05d}.safetensors"
    save_file(mine, str(path))
    fsync_path(path)
    _fault(faults, "checkpoint-shards")
    _barrier(group)
    if rank == 0:
        index = {name: f"shard-{r:05d}.safetensors" for name, r in owner.items()}
        state = {"step": step, **meta, "index": index}
        (tmp / STATE).write_text(json.dumps(state, indent=2) + "\n")
        fsync_path(tmp / STATE)
        _fault(faults, "checkpoint-manifest")
        write_manifest(tmp, step=step, sign_key=sign_key)
        _fault(faults, "checkpoint-rename")
        fsync_path(tmp)
        if final.exists():  # the same step written again (a restarted run): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_path(root)
    _barrier(group)
    return final


def _barrier(group: dist.ProcessGroup | None) -> None:
    if group is not None and dist.get_world_size(group) > 1:
        dist.barrier(group=group)


@dataclass
class Checkpoint:
    folder: Path
    step: int
    state: dict  # state.json
    tensors: dict[str, Tensor]


def read_checkpoint(folder: Path, *, verify_key: str = "") -> Checkpoint:
    """Verify the folder against its manifest (and signature), then read every shard."""
    from safetensors.torch import load_file

    verify(folder, verify_key=verify_key)
    state = json.loads((folder / STATE).read_text())
    tensors: dict[str, Tensor] = {}
    for path in sorted(folder.glob("shard-*.safetensors")):
        tensors |= load_file(str(path))
    return Checkpoint(folder, int(state["step"]), state, tensors)


@dataclass
class Checkpointer:
    """When to write and what: `collect()` gives this rank's logical tensors and rank 0's meta."""

    root: Path
    every: int
    total_steps: int
    group: dist.ProcessGroup | None
    collect: Callable[[], tuple[dict[str, Tensor], dict]]
    sign_key: str = ""
    faults: object = None

    def maybe_save(self, done_steps: int) -> Path | None:
        if self.every <= 0 or not (done_steps % self.every == 0 or done_steps == self.total_steps):
            return None
        tensors, meta = self.collect()
        return save_checkpoint(
            self.root, done_steps, tensors, meta=meta, group=self.group, sign_key=self.sign_key, faults=self.faults
        )


def rng_tensors(rank: int) -> dict[str, Tensor]:
    return {f"rng/rank{rank}": torch.get_rng_state()}


def restore_rng(checkpoint: Checkpoint, rank: int, world_size: int) -> None:
    """This rank's RNG state as saved, when the world is the same size."""
    key = f"rng/rank{rank}"
    if checkpoint.state.get("world_size") == world_size and key in checkpoint.tensors:
        torch.set_rng_state(checkpoint.tensors[key])
