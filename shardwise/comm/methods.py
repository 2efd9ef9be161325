"""The gradient compression methods (comm/compress.py), and the margin of a step each must
save to be chosen: by the launcher on the cost model's prediction (plan/compression.py),
and by the run on its own measurements (comm/trial.py)."""

from __future__ import annotations

METHODS = ("none", "bf16", "fp16", "int8", "topk", "powersgd")
LOSSY = ("int8", "topk", "powersgd")  # the methods with error feedback
HALF = ("bf16", "fp16")  # rounded, not dropped: a parameter server's pushes take these too


def in_hook(methods) -> bool:
    """Whether every one of `methods` (a run's method, or its trial's candidates) averages a
    bucket where DDP hands it over, in the autograd thread, before the backward goes on (the
    lossy ones, comm/compress.py): then DDP's small first bucket, made so that an
    all-reduce starts early beside the rest of the backward, overlaps nothing and only adds
    a round of collectives (parallel/data.py `bucket_caps`)."""
    return bool(methods) and all(m in LOSSY for m in methods)


# A method is chosen only where it saves this share of a step, predicted (the launcher's
# choice) and measured (the run's trial): a prediction is good to some tens of percent,
# and a method that wins by less may as well lose (Agarwal et al., MLSys 2022: compression
# rarely pays). A lossless method (bf16, fp16) must take at most this share of none's step ...
LOSSLESS_MARGIN = 0.9
# ... and a lossy one this share of the fastest lossless method's (none included): its risk
# is to accuracy, which no step time shows, and a lossless method takes none (the bench
# measured 1.5-2.2x the steps to 95% on the digits convnet, and top-k 1% never reaching it)
MARGIN = 2 / 3


def _lossless(times: dict[str, float]) -> dict[str, float]:
    """The lossless methods of `times` that save their margin of none's step (none always;
    every one where `times` has no none)."""
    none = times.get("none")
    return {
        m: t
        for m, t in times.items()
        if m not in LOSSY and (m == "none" or none is None or t <= LOSSLESS_MARGIN * none)
    }


def lossless_base(times: dict[str, float]) -> str | None:
    """The fastest lossless method of `times` that saves its own margin: the one a lossy
    method is judged against (None where `times` has no lossless method)."""
    lossless = _lossless(times)
    return min(lossless, key=lossless.get) if lossless else None


def fair(times: dict[str, float]) -> dict[str, float]:
    """The methods of `times` (seconds a step) that save their margin; none always. A
    lossless method is judged against none, a lossy one against `lossless_base`, where
    `times` has them (a run's trial times none only where the launcher shortlisted it)."""
    base = lossless_base(times)
    lossy = {m: t for m, t in times.items() if m in LOSSY and (base is None or t <= MARGIN * times[base])}
    return _lossless(times) | lossy
