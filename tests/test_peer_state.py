"""Recovery from the survivors' memory, its parts: the state a rank serves, only to a holder
of the job's secret, and never half a step (peer_state.py). The whole path, a rank killed and
the job going on from the survivor's step, is in test_recovery.py and test_elastic.py."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import torch

from shardwise.peer_state import ASK_STATE, MAGIC, NONCE, Holder, ask, fetch_best, serve_state


def _served(secret: str = "s" * 64, step: int = 7) -> tuple[Holder, str, dict]:
    tensors = {"model/w": torch.arange(6.0).reshape(2, 3), "optim/step/w": torch.tensor(3.0)}
    holder = Holder(step)
    holder.provider = lambda: ({k: v.clone() for k, v in tensors.items()}, {"world_size": 2, "schedule_step": 5})
    addr, port = serve_state(holder, secret, "127.0.0.1")
    return holder, f"{addr}:{port}", tensors


def test_a_holder_of_the_secret_gets_the_step_and_the_state():
    _, endpoint, tensors = _served()
    assert ask(endpoint, "s" * 64, state=False).step == 7
    got = ask(endpoint, "s" * 64, state=True)
    assert (got.step, got.meta) == (7, {"world_size": 2, "schedule_step": 5})
    assert got.tensors.keys() == tensors.keys()
    for key, value in tensors.items():
        assert torch.equal(got.tensors[key], value)


def test_without_the_secret_nothing_is_said():
    _, endpoint, _ = _served()
    with pytest.raises(ConnectionError):
        ask(endpoint, "t" * 64, state=True)
    addr, _, port = endpoint.rpartition(":")
    with socket.create_connection((addr, int(port)), timeout=5) as sock:  # a client that makes up a proof
        sock.recv(len(MAGIC) + NONCE, socket.MSG_WAITALL)
        sock.sendall(ASK_STATE + bytes(NONCE) + bytes(32))
        assert sock.recv(1 << 16) == b""  # closed, nothing sent


def test_the_most_advanced_survivor_is_taken():
    secret = "s" * 64
    behind, ahead = _served(secret, step=5)[1], _served(secret, step=9)[1]
    assert fetch_best([behind, ahead, "127.0.0.1:1"], secret, mine="127.0.0.1").step == 9


def test_a_snapshot_waits_for_the_step_under_way():
    holder, endpoint, _ = _served()
    inside, release = threading.Event(), threading.Event()

    def update() -> None:
        with holder.iteration(7):  # the eighth step: its update, then its logging and checkpoint
            holder.updating()
            inside.set()
            release.wait()

    thread = threading.Thread(target=update)
    thread.start()
    inside.wait()
    got: list = []
    asking = threading.Thread(target=lambda: got.append(ask(endpoint, "s" * 64, state=False)))
    asking.start()
    time.sleep(0.3)
    assert not got  # the weights are changing: no answer yet
    release.set()
    thread.join()
    asking.join()
    assert got[0].step == 8  # the step that was under way, complete


def test_a_step_that_fails_after_its_update_leaves_nothing_to_serve():
    holder, endpoint, _ = _served(step=7)
    with pytest.raises(RuntimeError), holder.iteration(7):  # a peer lost in the step's collectives
        raise RuntimeError("before the update")
    assert ask(endpoint, "s" * 64, state=True).step == 7  # the weights are still step 7's
    with pytest.raises(RuntimeError), holder.iteration(7):
        holder.updating()
        raise RuntimeError("a peer lost while the step is logged")
    assert ask(endpoint, "s" * 64, state=True) is None  # half a step: the checkpoint instead
