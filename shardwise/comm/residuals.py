"""A rank's error-feedback residuals (comm/compress.py), and what a step did to them, so
that a step the loop skips can be taken back.

The residuals are kept by parameter name (`by_name`: a checkpoint holds them by name), each a
view into the flat buffer of the bucket that averages its parameter. A bucket's next
residual is written into a spare buffer of its own and swapped in once the bucket's average
is finite. Each bucket's previous buffer stays as its spare until the next step, so a step
the loop then skips (a non-finite gradient in another bucket, a non-finite loss) swaps it
back: every residual is again what it was before the step, on every rank alike, as if the
step had never been averaged. A step's log goes once the next step ends.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Key = tuple[str, ...]  # the names of a bucket's parameters, in its order


class Residuals:
    def __init__(self) -> None:
        self.by_name: dict[str, Tensor] = {}
        self._flats: dict[Key, Tensor] = {}
        self._spares: dict[Key, Tensor] = {}
        self._log: list[Callable[[], None]] = []
        self._step: int | None = None  # the step `_log` belongs to

    def flat(self, flat: Tensor, entries) -> tuple[Key, Tensor]:
        """The residuals of a bucket's parameters as one flat tensor whose runs are the
        `by_name` entries (views), and its key: kept per set of parameters, so a bucket DDP rebuilds
        takes its parameters' residuals along (and the buffers that held them before go)."""
        key = tuple(e.name for e in entries)
        buf = self._flats.get(key)
        if buf is None or buf.numel() != flat.numel():
            buf = torch.zeros_like(flat)
            for e in entries:
                if e.name in self.by_name:
                    buf[e.offset : e.offset + e.numel].copy_(self.by_name[e.name].reshape(-1))
            names = set(key)
            for other in [k for k in self._flats if names.intersection(k)]:
                del self._flats[other]
                self._spares.pop(other, None)
            self._point(key, entries, buf)
        return key, buf

    def spare(self, key: Key, like: Tensor) -> Tensor:
        """The buffer a bucket's next residual is written into."""
        buf = self._spares.get(key)
        if buf is None or buf.numel() != like.numel() or buf.dtype != like.dtype:
            buf = self._spares[key] = torch.empty_like(like)
        return buf

    def keep(self, step: int, key: Key, entries, new: Tensor) -> None:
        """`new` becomes the bucket's residuals and its buffer of before the spare: a swap, no
        copy, taken back if the loop skips `step`."""
        old = self._flats[key]
        self._point(key, entries, new)
        self._spares[key] = old
        self.log(step, lambda: self._swap_back(key, entries, old, new))

    def settle(self, step: int, flat: Tensor, entries) -> None:
        """Add into `flat` what its parameters owe and drop it (a method without error feedback
        averages it); taken back if the loop skips `step`."""
        if not any(e.name in self.by_name for e in entries):
            return
        key, owed = self.flat(flat, entries)
        flat.add_(owed)
        del self._flats[key]
        self._spares.pop(key, None)
        for e in entries:
            self.by_name.pop(e.name, None)
        self.log(step, lambda: self._point(key, entries, owed))

    def log(self, step: int, undo: Callable[[], None]) -> None:
        """Remember how to take back a change `step` made."""
        if self._step != step:
            self._log.clear()
            self._step = step
        self._log.append(undo)

    def expire(self, step: int) -> None:
        """`step` ends: what steps before it logged can no longer be taken back (nor held)."""
        if self._step is not None and self._step < step:
            self._log.clear()

    def take_back(self, step: int) -> bool:
        """Undo, newest first, what `step` changed; whether there was anything."""
        if self._step != step or not self._log:
            return False
        for undo in reversed(self._log):
            undo()
        self._log.clear()
        return True

    def forget(self) -> None:
        """After `by_name` was set from outside (a checkpoint): the next average builds its flat
        residuals from it."""
        self._flats.clear()
        self._spares.clear()
        self._log.clear()

    def _swap_back(self, key: Key, entries, old: Tensor, new: Tensor) -> None:
        self._point(key, entries, old)
        self._spares[key] = new

    def _point(self, key: Key, entries, buf: Tensor) -> None:
        self._flats[key] = buf
        for e in entries:
            self.by_name[e.name] = buf[e.offset : e.offset + e.numel].view(e.shape)
