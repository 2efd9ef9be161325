"""Writing and reading checkpoints: sharded, atomic, verified.

    OUT/checkpoints/step-00000012/
        shard-00000.safetensors   the logical tensors rank 0 was given to write, and its RNG state
        shard-00001.safetensors   ...
        config.toml               the run's config (what a resume starts from, but its trust settings)
        state.json                step, schedule position, which file holds which tensor
        manifest.json             every file above with its size and SHA-256, written last
        manifest.sig              Ed25519 signature of manifest.json (with checkpoint.sign_key)

The tensors are spread over the ranks that hold them, balanced by bytes, and
every rank writes its file at the same time. Everything goes into
`.tmp-step-N/` first; each file is fsynced, rank 0 writes state.json and the
manifest last, then moves the folder into place and fsyncs its parent. A
folder named step-N therefore always has its manifest; one killed halfway is
still .tmp-step-N and is never read. A step written again (a run resumed from
an older checkpoint) takes the place of the old one in one atomic exchange
(renameat2 RENAME_EXCHANGE), so step-N is never missing. Only safetensors and
JSON are read, from the very bytes whose hashes were checked.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from shardwise.checkpoint.manifest import MANIFEST, STEP_DIR, step_dir, verified_files, write_manifest
from shardwise.checkpoint.seal import CIPHER, checkpoint_label, load_key, opened, seal
from shardwise.comm.collectives import all_gather_json
from shardwise.errors import ShardwiseError
from shardwise.files import fsync_path

STATE, CONFIG = "state.json", "config.toml"


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
    config_text: str = "",
    faults=None,
    encrypt_key: str = "",
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
    from safetensors.torch import save

    key = load_key(encrypt_key) if encrypt_key else None
    _write(tmp / f"shard-{rank:05d}.safetensors", save(mine), key, step)
    _fault(faults, "checkpoint-shards")
    _barrier(group)
    if rank == 0:
        index = {name: f"shard-{r:05d}.safetensors" for name, r in owner.items()}
        state = {"step": step, **meta, "index": index}
        _write(tmp / STATE, (json.dumps(state, indent=2) + "\n").encode(), key, step)
        _write(tmp / CONFIG, config_text.encode(), key, step)
        _fault(faults, "checkpoint-manifest")
        write_manifest(tmp, step=step, sign_key=sign_key, sealed=CIPHER if key else "")
        _fault(faults, "checkpoint-rename")
        fsync_path(tmp)
        _publish(tmp, final, faults)
        fsync_path(root)
    _barrier(group)
    return final


def _write(path: Path, data: bytes, key: bytes | None, step: int) -> None:
    """A checkpoint file, sealed with `key` where one is given (its name and step bound in), fsynced."""
    path.write_bytes(seal(data, key, checkpoint_label(path.name, step)) if key is not None else data)
    fsync_path(path)


RENAME_EXCHANGE = 2
AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2); False where not supported."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this file system cannot
        return False
    raise OSError(errno, os.strerror(errno), str(b))


def _publish(tmp: Path, final: Path, faults=None) -> None:
    """Put the finished folder `tmp` in place as `final`. When `final` exists (the same
    step written again) the two are exchanged atomically and the old one removed, so
    there is a complete `final` at every moment."""
    if not final.exists():
        os.replace(tmp, final)
        shutil.rmtree(final.with_name(f".old-{final.name}"), ignore_errors=True)  # a crash's leftover
        return
    if not _exchange(tmp, final):  # no atomic exchange here: the old one waits aside until the new is in
        old = final.with_name(f".old-{final.name}")  # read in step-N's place while it is missing
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        _fault(faults, "checkpoint-aside")
        os.replace(tmp, final)
        tmp = old
    _fault(faults, "checkpoint-replace")
    shutil.rmtree(tmp)


def _barrier(group: dist.ProcessGroup | None) -> None:
    if group is not None and dist.get_world_size(group) > 1:
        dist.barrier(group=group)


@dataclass
class Checkpoint:
    folder: Path
    step: int
    state: dict  # state.json
    tensors: dict[str, Tensor]
    config_text: str = ""  # the saving run's config.toml

    @property
    def schedule_step(self) -> int:
        """Steps the learning-rate schedule had taken (skipped steps take none)."""
        return int(self.state.get("schedule_step", self.step))


def read_checkpoint(folder: Path, *, verify_key: str = "", encrypt_key: str = "") -> Checkpoint:
    """Read the folder's files once, check them against the manifest (and signature),
    decrypt them where it is sealed (with `encrypt_key`), and load those same bytes:
    safetensors shards, state.json, config.toml."""
    from safetensors.torch import load

    files = verified_files(folder, verify_key=verify_key)
    manifest = next(files)
    shards: dict[str, dict[str, Tensor]] = {}
    state, config_text = None, ""
    for name, data in files:  # each file loaded as it is checked: one file's bytes at a time
        data = opened(manifest, name, data, encrypt_key, folder)
        if name == STATE:
            state = _state(folder, data, manifest)
        elif name == CONFIG:
            config_text = data.decode("utf-8", errors="replace")
        elif name.startswith("shard-") and name.endswith(".safetensors"):
            try:
                shards[name] = load(data)
            except Exception as e:  # safetensors' own error type: a header or layout it cannot read
                first = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise ShardwiseError("checkpoint", f"{folder / name}: not a valid safetensors file ({first})") from None
        del data
    if state is None:
        raise ShardwiseError("checkpoint", f"{folder}: no {STATE}")
    # each tensor from the one shard the index names; rank r's RNG state from its own shard
    tensors: dict[str, Tensor] = {}
    for tensor, shard in state["index"].items():
        if shard not in shards or tensor not in shards[shard]:
            raise ShardwiseError("checkpoint", f"{folder / STATE}: lists {tensor} in {shard}, which does not hold it")
        tensors[tensor] = shards[shard][tensor]
    for shard, held in shards.items():
        own = f"rng/rank{int(shard.removeprefix('shard-').removesuffix('.safetensors'))}"
        if own in held:
            tensors[own] = held[own]
    return Checkpoint(folder, state["step"], state, tensors, config_text)


def _state(folder: Path, data: bytes, manifest: dict) -> dict:
    """state.json, checked: the step the manifest (and its signature) says, an index of
    logical tensors to shard files."""
    try:
        state = json.loads(data)
        index = state.get("index")
        if not isinstance(index, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in index.items()):
            raise ValueError("its index is not a map of tensor names to shard files")
        if not isinstance(state.get("step"), int) or state["step"] != manifest["step"]:
            raise ValueError(f"step {state.get('step')!r}, the manifest says {manifest['step']}")
    except (ValueError, AttributeError, TypeError) as e:
        raise ShardwiseError("checkpoint", f"{folder / STATE}: not a valid state file ({e})") from None
    return state


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
    config_text: str = ""  # the run's config, kept inside every checkpoint
    keep: int = 0  # the newest this many complete checkpoints stay (0: all)
    encrypt_key: str = ""  # the AES-256 key file every file is sealed with (none: plain)

    def maybe_save(self, done_steps: int) -> Path | None:
        if self.every <= 0 or not (done_steps % self.every == 0 or done_steps == self.total_steps):
            return None
        tensors, meta = self.collect()
        saved = save_checkpoint(
            self.root,
            done_steps,
            tensors,
            meta=meta,
            group=self.group,
            sign_key=self.sign_key,
            config_text=self.config_text,
            faults=self.faults,
            encrypt_key=self.encrypt_key,
        )
        if self.keep and (self.group is None or dist.get_rank(self.group) == 0):
            prune(self.root, self.keep)
        return saved


def prune(root: Path, keep: int) -> list[Path]:
    """Remove all but the newest `keep` complete step-N folders (never an incomplete one, nor
    one set aside while a step was written again); the ones removed, oldest first."""
    complete = sorted(
        (int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and (p / MANIFEST).is_file()
    )
    gone = [p for _, p in complete[:-keep]]
    for p in gone:
        shutil.rmtree(p)
    return gone


def rng_tensors(rank: int) -> dict[str, Tensor]:
    return {f"rng/rank{rank}": torch.get_rng_state()}


def restore_rng(checkpoint: Checkpoint, rank: int, world_size: int) -> None:
    """This rank's RNG state as saved, when the world is the same size."""
    key = f"rng/rank{rank}"
    if checkpoint.state.get("world_size") == world_size and key in checkpoint.tensors:
        torch.set_rng_state(checkpoint.tensors[key])
