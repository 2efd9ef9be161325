"""Measured memory is measured: the peak resident memory follows what a process touches,
and starting a measurement resets it."""

from __future__ import annotations

import sys

import pytest
import torch

from shardwise.parallel.splits import sum_of_squares
from shardwise.train.memory import measured_bytes, start_measuring

MIB = 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and its reset are Linux's")
def test_peak_resident_memory_follows_an_allocation_and_resets():
    cpu = torch.device("cpu")
    start = start_measuring(cpu)
    big = torch.ones(256 * MIB // 4)  # 256 MiB, every page touched
    rss_start, peak, gpu = measured_bytes(cpu, start)
    assert rss_start == start > 50 * MIB and gpu == 0
    assert peak - start >= 250 * MIB
    del big
    again = start_measuring(cpu)  # the peak now starts from what is resident after the free
    _, peak_after, _ = measured_bytes(cpu, again)
    assert peak_after < peak - 200 * MIB


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and its reset are Linux's")
def test_the_gradient_norm_is_exact_in_float64_without_a_float64_copy():
    cpu = torch.device("cpu")
    grad = torch.randn(64 * MIB // 4, generator=torch.Generator().manual_seed(0)) * 1e3  # 64 MiB of float32
    whole = grad.double().pow(2).sum()  # the reference: a float64 copy, squared, summed
    start = start_measuring(cpu)
    chunked = sum_of_squares(grad)
    _, peak, _ = measured_bytes(cpu, start)
    assert chunked.dtype == torch.float64
    assert chunked.item() == pytest.approx(whole.item(), rel=1e-12)
    assert peak - start < 8 * MIB  # the copy and its square would be 256 MiB
