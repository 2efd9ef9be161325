"""The gradient compression methods (comm/compress.py), and the margin each must save of
none's step to be chosen: by the launcher on the cost model's prediction
(plan/compression.py), and by the run on its own measurements (comm/trial.py)."""

from __future__ import annotations

METHODS = ("none", "bf16", "fp16", "int8", "topk", "powersgd")
LOSSY = ("int8", "topk", "powersgd")  # the methods with error feedback
HALF = ("bf16", "fp16")  # rounded, not dropped: a parameter server's pushes take these too

# A method replaces none only where it takes at most this share of none's step: a
# prediction is good to some tens of percent, and a method that wins by less may as well
# lose (Agarwal et al., MLSys 2022: compression rarely pays). Lossless (bf16, fp16) ...
LOSSLESS_MARGIN = 0.9
# ... and lossy, which can also need more steps to the same accuracy, which no step time
# shows (the bench measured 1.5-2.2x the steps on the digits convnet, and top-k 1% never
# reaching 95% there)
MARGIN = 2 / 3


def bar(method: str) -> float:
    """The share of none's step `method` must come under to be chosen."""
    return 1.0 if method == "none" else MARGIN if method in LOSSY else LOSSLESS_MARGIN
