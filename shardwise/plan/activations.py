"""The memory a model's passes take beyond its weights, measured per sample: a training
forward + backward (what autograd keeps for the backward and what the backward allocates
while it runs, the parameters' gradients left out) and an evaluation forward under
`no_grad` (each layer's input and output alive at once, and whatever the kernels allocate
beside: a convolution's reordered copies and its primitives' scratch memory), as a whole
and during each layer (`eval_layers`: the peak while that layer runs, the model's input
alive, as a pipeline stage or a band holds it for its own layers). Counting only each
layer's output misses those; the planner's memory model takes these figures where they
were measured. The training pass is measured a second time with every unit
checkpointed (`parallel/recompute.py`): the figure `train.activation_checkpointing =
layers` is priced with.

Measured in a process of its own (`python -m shardwise.plan.activations SPEC`), as the
growth of its peak resident memory (VmHWM, reset before each pass) over the first pass at
each batch size (as in a run, what kernels set up once per shape is in the figure; what
the process sets up once, the autograd engine, is told apart by a second batch size), with
glibc's allocator told to give every freed block of 64 KiB or more straight back to the
system (`MALLOC_MMAP_THRESHOLD_`): a freed block it kept would be reused without raising
the peak, and the figure would read low. That setting slows every allocation, so it stays
out of the process that times the layers. Elsewhere than Linux: not measured (0), and the
memory model counts layer outputs instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from torch import nn

GIVE_BACK_ABOVE = str(64 * 1024)


TIMEOUT_S = 300  # a first pass at a profiled batch size takes seconds, even for a large-image model


def measure_in_child(spec: dict) -> dict[str, float]:
    """`pass_bytes` for the model `spec` names (`model`: the [model] settings, `in_shape`,
    `num_classes`, `dtype`, `seed`, `train_samples`, `eval_samples`), measured in a fresh
    process; {} where it is not measured (elsewhere than Linux); {"failed": why} where the
    process failed (the memory model counts layer outputs instead, and the profile is not
    kept, so the next plan measures again)."""
    if not sys.platform.startswith("linux"):
        return {}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": GIVE_BACK_ABOVE, "MALLOC_TRIM_THRESHOLD_": GIVE_BACK_ABOVE}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)  # a model of the user's own imports as here
    command = [sys.executable, "-m", "shardwise.plan.activations", json.dumps(spec)]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"failed": f"measuring the passes' memory took over {TIMEOUT_S} s"}
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        return {"failed": f"measuring the passes' memory failed (exit {done.returncode}): {last}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _peak_growth(run) -> int:
    from shardwise.train.memory import measured_bytes, start_measuring

    cpu = torch.device("cpu")
    start = start_measuring(cpu)
    _, peak, _ = measured_bytes(cpu, start)
    if peak - start > 1 << 20:  # the peak kept from before: this kernel did not reset it
        raise RuntimeError(f"the peak resident memory was not reset ({peak - start} bytes above the resident)")
    run()
    _, peak, _ = measured_bytes(cpu, start)
    return max(0, peak - start)


def pass_bytes(model: nn.Module, sample: torch.Tensor, train_samples: int, eval_samples: int) -> dict[str, float]:
    """What the passes take beyond the weights, in this process: `train_fixed` and
    `train` (bytes per sample) of a forward + backward, from the first on `train_samples`
    copies of `sample` and the first on twice as many (the process's one-time set-up, the
    autograd engine's, falls in the fixed part); and `eval`, per sample of the first
    `no_grad` forward on `eval_samples`."""
    fixed, per_sample = line(model, sample, train_samples)
    model.eval()
    with torch.no_grad():
        evaluated = _peak_growth(lambda: model(sample.expand(eval_samples, *sample.shape).contiguous()))
        per_layer = eval_layers(model, sample, eval_samples)
    return {"train_fixed": fixed, "train": per_sample, "eval": evaluated / eval_samples, "eval_layers": per_layer}


def eval_layers(model: nn.Module, sample: torch.Tensor, samples: int) -> dict[str, float]:
    """Per sample, the peak resident growth (over the process before the pass) while each
    of the model's layers (`parallel/pipeline.py` `model_layers`) runs an evaluation
    forward on `samples` copies of `sample`: its input, its output, the kernels' scratch
    and the model's input; {} for a model without the stacks. Run after a first pass at
    this size, so the kernels' one-time set-up is not in any one layer's figure."""
    from shardwise.errors import ShardwiseError
    from shardwise.parallel.pipeline import model_layers
    from shardwise.train.memory import measured_bytes, start_measuring

    try:
        layers = model_layers(model)
    except ShardwiseError:
        return {}
    cpu = torch.device("cpu")
    base = start_measuring(cpu)
    peaks: dict[str, float] = {}

    def reset(_module, _args) -> None:
        start_measuring(cpu)

    def read(name: str):
        def hook(_module, _args, _out) -> None:
            peaks[name] = max(0, measured_bytes(cpu, base)[1] - base) / samples

        return hook

    handles = [h for name, layer in layers for h in (layer.register_forward_pre_hook(reset),
               layer.register_forward_hook(read(name)))]  # fmt: skip
    try:
        model(sample.expand(samples, *sample.shape).contiguous())
    finally:
        for handle in handles:
            handle.remove()
    return peaks


def line(model: nn.Module, sample: torch.Tensor, train_samples: int) -> tuple[float, float]:
    """(fixed, per sample) bytes of a forward + backward beyond the weights and gradients,
    from the first pass at `train_samples` and at twice as many (`pass_bytes`'s figures)."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = sum(p.numel() * p.element_size() for p in params)

    def step(n: int):
        def run():
            model(sample.expand(n, *sample.shape).contiguous()).float().sum().backward()
            for p in params:
                p.grad = None

        return run

    model.train()
    first = max(0, _peak_growth(step(train_samples)) - grads)
    per_sample = max(0, _peak_growth(step(2 * train_samples)) - grads) / (2 * train_samples)
    return max(0.0, first - per_sample * train_samples), per_sample


def _main(text: str) -> None:
    from shardwise.config import ModelConfig
    from shardwise.errors import ShardwiseError
    from shardwise.models import build_model
    from shardwise.parallel.recompute import checkpoint_layers

    spec = json.loads(text)
    torch.set_num_threads(1)  # as a rank computes
    torch.manual_seed(spec["seed"])
    dtype = getattr(torch, spec["dtype"])
    model = build_model(ModelConfig(**spec["model"]), tuple(spec["in_shape"]), spec["num_classes"]).to(dtype)
    sample = torch.randn(spec["in_shape"]).to(dtype)
    found = pass_bytes(model, sample, spec["train_samples"], spec["eval_samples"])
    try:  # the training pass again with every unit checkpointed
        checkpoint_layers(model)
    except ShardwiseError:  # a model of the user's own without the stacks: layers is refused anyway
        pass
    else:
        # per sample: the engine's one-time set-up is the unchecked passes' fixed part. Twice,
        # the smaller kept: after the unchecked passes, a pass's peak now and then also holds
        # about 2 MB the allocator left scattered (measured 17-18 KB a sample, and 32.7 in some
        # runs, on the same convnet), and a peak can only read high, never low
        found["checkpointed"] = min(line(model, sample, spec["train_samples"])[1] for _ in range(2))
    print(json.dumps(found))


if __name__ == "__main__":
    _main(sys.argv[1])
