"""Scaling efficiency: throughput at N workers / (N x throughput of one worker).

Weak scaling, as data-parallel users grow a job: every worker keeps its batch
(global batch = N x PER_WORKER), so perfect scaling gives 1.0 and the loss is
what synchronising the gradients costs. Two models bracket the range:

- compute-bound: the convnet on digits (144 k parameters, 0.6 MB of gradients
  against a batch of convolutions);
- communication-bound: a wide MLP (256 -> 2048 -> 2048 -> 10, 4.7 M
  parameters, 19 MB of gradients) with a small batch.

Each repetition runs the one-worker and N-worker jobs side by side (rotated);
the efficiency of a repetition is t(1) / t(N), per-step times after warm-up.
On one machine the workers share its cores, so the compute-bound figure also
measures CPU sharing; on the emulated cluster it adds the shaped links.
"""

from __future__ import annotations

from shardwise.bench.common import Bench, alternate

N, STEPS = 2, 30
MODELS = {
    "compute-bound (convnet, digits)": (["--model.name", "convnet"], 128),
    "communication-bound (mlp 256-2048-2048-10)": (
        ["--model.name", "mlp", "--model.hidden", "2048,2048", "--data.name", "synthetic", "--data.shape", "256"],
        8,
    ),
}


def run(b: Bench) -> None:
    b.console.print(
        f"[bold]scaling[/]: weak scaling, 1 vs {N} data-parallel workers ({b.where}), {STEPS} steps per run, "
        f"{b.repeats} rotated repetitions"
    )
    for name, (model, per_worker) in MODELS.items():

        def side(n: int, model: list[str] = model, per_worker: int = per_worker):
            args = ["--nproc", str(n), "--train.batch_size", str(per_worker * n), *model]
            return lambda i: b.train(args, f"scaling-{per_worker}-{n}-{i}", steps=STEPS)["step_time_s"]

        sides = {f"{n} worker{'s' * (n > 1)}": side(n) for n in (1, N)}
        b.console.print(f"  {name}, {per_worker} samples per worker")
        times = alternate(sides, b.repeats, b.console)
        one, many = times["1 worker"], times[f"{N} workers"]
        how = f"{per_worker} samples per worker, efficiency t(1) / t(N)"
        text = b.ratio("scaling", f"efficiency N={N}: {name}", one, many, how=how)
        b.console.print(f"  scaling efficiency at N={N}, {name}: [bold]{text}[/]")
