"""Typed run configuration: dataclass sections, a TOML file, `--section.key value` overrides.

Each field carries its documentation as the string literal right below it
(the attribute-docstring convention); :func:`field_docs` reads those strings
back from the source so `shardwise train --help` and the errors can show them.
Nothing here imports torch: the launcher validates a config in a fraction of
a second, before any worker starts or anything is written.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import textwrap
import tomllib
import typing
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

from shardwise.config_check import coerce, validate
from shardwise.config_sections import DataConfig, ModelConfig, ServeConfig
from shardwise.errors import ShardwiseError


@dataclass
class ParallelConfig:
    layout: Literal["manual", "auto"] = "manual"
    """manual: the degrees below; auto: the launcher runs the planner (`shardwise plan`) for
    --nproc and trains with the layout it predicts fastest within the memory (the run's saved
    config then names that layout)."""
    dp: int | None = None
    """Data-parallel degree (default: the number of processes / (pp x spatial x vertical x tp))."""
    tp: int = 1
    """Tensor-parallel degree: the fully-connected layers are split across this many ranks
    (column-parallel then row-parallel in pairs, Megatron-style)."""
    spatial: int = 1
    """Spatial partitioning: every feature map of the conv stack is cut into this many bands
    of rows, one per rank, with halo rows exchanged before each window."""
    pp: int = 1
    """Pipeline stages: the layers are cut into this many consecutive stages, one per rank,
    at boundaries chosen by each layer's measured cost (its size under train.deterministic)."""
    microbatches: int | None = None
    """Micro-batches per step flowing through the pipeline (default: 2 x parallel.pp)."""
    schedule: Literal["gpipe", "1f1b", "interleaved", "zero-bubble", "zbv"] = "1f1b"
    """Pipeline schedule, torch's own: gpipe (all forwards, then all backwards), 1f1b (one
    forward, one backward in turn: at most pp micro-batches of activations held per stage);
    with several stages a rank (parallel.virtual_stages): interleaved (Megatron's interleaved
    1F1B), zero-bubble (interleaved, each backward split into the input's gradient and the
    weights', the latter filling the bubble) or zbv (zero bubble on two stages a rank placed
    in a V: rank r holds stages r and 2 x pp - 1 - r)."""
    virtual_stages: int | None = None
    """Pipeline stages each rank holds (the model is cut into pp x this many): 1 for gpipe and
    1f1b, 2 by default for interleaved and zero-bubble (rank r holds stages r, r + pp, ...),
    exactly 2 for zbv."""
    bucket_mb: float | None = None
    """Data parallelism through DDP (shard none or optimizer): the size of its gradient buckets in
    MiB, the first one's too (torch's bucket_cap_mb). Unset: torch's own, the first bucket 1 MiB
    and the others 25 (bench buckets measures others on each link)."""
    shard: Literal["none", "optimizer", "full"] = "none"
    """Sharding across data-parallel ranks: none (DDP), optimizer (optimizer state only,
    ZeRO-1) or full (parameters, gradients and optimizer state, FSDP2)."""
    mode: Literal["allreduce", "ps"] = "allreduce"
    """How data-parallel ranks agree on the weights: allreduce (peers average their gradients)
    or ps (a parameter server: workers push gradients to server ranks, which own the weights
    and the optimizer, and pull fresh weights back; see the ps section)."""
    servers: int = 1
    """Parameter server (parallel.mode=ps): the first this many ranks are servers, each owning
    an equal slice of the flattened parameters and its optimizer state; the rest are workers."""
    colocate: bool = False
    """Parameter server (parallel.mode=ps): every rank is a worker and also the server of one
    slice (parallel.servers is then the number of ranks), so pushes and pulls spread over
    every rank's link, as BytePS does, instead of crossing the few servers' links."""
    vertical: int = 1
    """Vertical partitioning: split the input features across this many ranks; each holds
    only its own columns and computes the first layer's partial product on them."""
    vertical_unit: Literal["feature", "channel", "row"] = "feature"
    """What moves between vertical ranks as a whole: a feature (one input element), a channel
    (all its pixels; the only unit a convolutional first layer accepts) or an image row."""
    vertical_split: Literal["contiguous", "balanced"] = "contiguous"
    """How units are assigned to vertical ranks: contiguous runs of equal count, or balanced
    by parallel.feature_cost (greedy, largest first)."""
    feature_cost: list[float] = field(default_factory=list)
    """Cost of each input feature (flattened, one per element) for vertical_split=balanced;
    empty: every feature costs 1."""


@dataclass
class TrainConfig:
    steps: int = 500
    """Number of optimizer steps."""
    batch_size: int = 64
    """Global batch: samples per optimizer step summed over all data-parallel ranks."""
    grad_accum: int = 1
    """Micro-batches per optimizer step on each rank (gradient accumulation)."""
    lr: float = 0.05
    """Peak learning rate."""
    optimizer: Literal["sgd", "adamw"] = "sgd"
    """Optimizer: sgd (with momentum) or adamw."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 0.0
    """Weight decay (decoupled for adamw)."""
    adam_eps: float = 1e-8
    """AdamW's epsilon: gradients much smaller than it get proportionally smaller steps."""
    schedule: Literal["constant", "step", "cosine"] = "cosine"
    """Learning-rate schedule after warm-up: constant, step or cosine (to zero at the last step)."""
    warmup_steps: int = 20
    """Linear warm-up from 0 to train.lr over this many steps."""
    step_every: int = 100
    """Step schedule: multiply the rate by train.step_gamma every this many steps."""
    step_gamma: float = 0.1
    """Step schedule: the factor applied every train.step_every steps."""
    clip_norm: float = 0.0
    """Clip the global gradient norm to this value (0: off)."""
    seed: int = 0
    """Seed for weights, data order and partitioning."""
    log_every: int = 10
    """Log the loss (averaged over ranks) every this many steps."""
    eval_every: int = 100
    """Evaluate on the validation set every this many steps, and at the end (0: only at the end)."""
    checkpoint_every: int = 0
    """Write a checkpoint to OUT/checkpoints/step-N every this many steps and at the end (0: never)."""
    keep_checkpoints: int = 0
    """Keep only the newest this many complete checkpoints, removing older ones once a newer
    one is complete (0: keep all)."""
    collective_timeout_s: float = 300.0
    """A collective or point-to-point transfer that waits longer than this fails, so a rank
    that stops answering ends the job instead of hanging it."""
    rejoin_timeout_s: float = 30.0
    """--nproc MIN:MAX: a host that cannot be reached after a failure is waited for this long;
    then the job goes on without it (elastic.py)."""
    recovery: Literal["peer", "disk"] = "peer"
    """After a failure (--max-restarts): peer: the new ranks take the state from the memory of
    the ranks that survived, at the last step those completed, where every rank holds the
    whole model and optimizer state (data parallel, no sharding, no error-feedback
    compression, data from files); otherwise, and with disk, from the newest checkpoint."""
    max_bad_steps: int = 3
    """A step whose loss or gradients are not finite on any rank is skipped on all ranks; after
    this many such steps in a row the run stops."""
    deterministic: bool = False
    """torch.use_deterministic_algorithms, and a pipeline cut by its layers' sizes rather than
    their measured time: resumed runs then repeat uninterrupted ones bit for bit."""
    dtype: Literal["float32", "float64"] = "float32"
    """Parameters, gradients, optimizer state and activations: float32, or float64 (slower; the
    synchronous layouts tested then equal one process to 1e-9: no rounding flips a max-pool tie)."""
    activation_checkpointing: Literal["none", "layers", "auto"] = "none"
    """none; layers: the backward runs each unit's forward again instead of keeping its
    activations (a layer with weights and the norm and parameter-free layers after it, or a
    residual block; less memory, about one more forward of time); auto: the launcher
    checkpoints only where the cost model predicts the layout's peak over the memory a rank
    has, and says so in one line."""
    memory_per_rank: str = ""
    """The memory a rank may use, e.g. 2GiB (empty: what this machine has available, shared by
    its ranks): what train.activation_checkpointing=auto and parallel.layout=auto plan
    within, and `shardwise plan`'s budget when it names none."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """The forward's arithmetic: fp32, or bf16 (torch.autocast: bfloat16 matrix products and
    convolutions; float32 weights, gradients, optimizer state and reductions; evaluation in fp32)."""


@dataclass
class PsConfig:
    asynchronous: bool = False
    """Servers apply each worker's gradient as it arrives instead of waiting for all workers
    of a step; a worker's pull waits only as far as ps.staleness demands."""
    staleness: int = 0
    """Asynchronous mode: a worker may start step t only when every live worker has pushed
    step t - staleness - 1, i.e. it runs at most this many steps ahead of the slowest
    (0: lock-step, the synchronous schedule)."""
    slow_worker: int = -1
    """Test and benchmark aid: the rank of a worker made ps.slow_factor times slower on every
    step (-1: each step a different worker, drawn with train.seed)."""
    slow_factor: float = 1.0
    """Test and benchmark aid: the chosen worker sleeps (factor - 1) x its compute time after
    each step's backward (1: no straggler)."""


@dataclass
class CommConfig:
    compression: Literal["none", "bf16", "fp16", "int8", "topk", "powersgd", "auto"] = "none"
    """How data-parallel ranks send their gradients to be averaged: none (float32, exact),
    bf16 or fp16 (half the bytes, rounded), int8 (a quarter, a scale per 1024 entries), topk (the
    comm.topk_ratio largest entries, values and indices) or powersgd (rank comm.powersgd_rank
    factors of each weight matrix). int8, topk and powersgd carry what they did not send into
    the next step (error feedback): the run no longer matches one process's. auto: the
    launcher picks the method the cost model predicts fastest on this link, in one line."""
    topk_ratio: float = 0.01
    """topk: the share of a bucket's entries each rank sends."""
    powersgd_rank: int = 4
    """powersgd: the rank of each weight matrix's factors."""
    warmup_steps: int = 0
    """Average exactly (no compression) for this many first steps."""
    candidates: list[str] = field(default_factory=list)
    """Methods the ranks time on the run itself, a few steps each right after the warm-up,
    keeping the fastest for the rest of the run (comm.compression names one of them). auto
    sets them: the methods the cost model predicts within a quarter of its choice, and the
    fastest lossless one where a lossy candidate's margin over it is a close call. Empty:
    comm.compression throughout."""
    min_bucket_bytes: int = 0
    """A bucket of gradients smaller than this many bytes is averaged whole (a plain
    all-reduce) whatever the method: there a method's compute and extra collectives cost
    more than the bytes it saves. auto sets it from the cost model's prediction for each of
    DDP's buckets on this link. 0: every bucket goes through the method."""


@dataclass
class CheckpointConfig:
    sign_key: str = ""
    """Ed25519 private key (PEM, from `shardwise keygen`): sign every checkpoint's manifest."""
    verify_key: str = ""
    """Ed25519 public key (PEM): load only checkpoints whose manifest it verifies."""
    encrypt_key: str = ""
    """AES-256 key file (from `shardwise keygen --encryption`): write every checkpoint file
    encrypted (AES-256-GCM), and read encrypted checkpoints with it."""


@dataclass
class RunConfig:
    out: str = ""
    """Output folder (default: a new folder under runs/)."""
    progress: bool = True
    """Show a progress bar on rank 0."""
    timeline: bool = False
    """Pipeline: record every micro-batch's forward and backward on every stage and write
    timeline.png (a Gantt chart per stage) for the last step."""
    predictions: str = ""
    """After the last step, write the class probabilities of every validation input, in
    their order, to this .npy file (what `shardwise predict --nproc` runs)."""
    tensorboard: bool = False
    """Also write TensorBoard event files (tensorboard/ in the run folder): loss, validation
    loss and accuracy, learning rate, gradient norm, samples/s and the communication share."""
    comm_share: bool = False
    """Profile each logged step (torch.profiler) for the share of its wall time this rank spent
    in communication that no computation overlapped (comm_share in metrics.jsonl)."""
    profile: bool = False
    """Profile each logged step on every rank (torch.profiler): where its time went (compute,
    copies, exposed communication, the rest: Python and waits outside the communication
    library) in OUT/profile/rank-R.json, and the last one's Chrome trace in rank-R.trace.json."""
    resume: str = ""
    """A checkpoint folder (or a run folder: its newest complete checkpoint) to continue from."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ps: PsConfig = field(default_factory=PsConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)


# section name -> its dataclass (annotations are strings under `from __future__`)
SECTIONS: dict[str, type] = typing.get_type_hints(Config)


@cache
def field_docs(section_cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass, read from its source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(section_cls)))
    body = tree.body[0].body
    docs: dict[str, str] = {}
    for node, after in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def _unknown_key(key: str) -> ShardwiseError:
    near = difflib.get_close_matches(key, all_keys(), n=1)
    hint = f" (did you mean {near[0]}?)" if near else ""
    return ShardwiseError(key, f"unknown config key{hint}")


# keys that moved: every layout key lives under [parallel]
MOVED = {
    "data.vertical": "parallel.vertical",
    "data.vertical_unit": "parallel.vertical_unit",
    "data.vertical_split": "parallel.vertical_split",
    "data.feature_cost": "parallel.feature_cost",
    "ps.servers": "parallel.servers",
    "ps.colocate": "parallel.colocate",
}


def _set(cfg: Config, key: str, value: Any, from_text: bool, *, follow_moved: bool = False) -> None:
    """`follow_moved`: take a moved key under its new name (a checkpoint written before the
    move); otherwise a moved key is an error that names where it went."""
    if key in MOVED:
        if not follow_moved:
            new = MOVED[key]
            raise ShardwiseError(key, f"moved to {new} (every layout key is under [parallel])")
        key = MOVED[key]
    section_name, _, name = key.partition(".")
    if section_name not in SECTIONS or not name:
        raise _unknown_key(key)
    section_cls = SECTIONS[section_name]
    hints = typing.get_type_hints(section_cls)
    if name not in hints:
        raise _unknown_key(key)
    setattr(getattr(cfg, section_name), name, coerce(key, hints[name], value, from_text))


# what a resumed run never takes from the checkpoint it resumes: which keys to trust
# (the checkpoint cannot vouch for itself) and where this invocation writes
NOT_RESUMED = ("checkpoint", "run", "serve")


def _apply_toml(
    cfg: Config,
    text: str,
    where: str,
    *,
    skip: tuple[str, ...] = (),
    only: tuple[str, ...] | None = None,
    follow_moved: bool = False,
) -> None:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ShardwiseError("config", f"{where}: {e}") from None
    for section, values in data.items():
        if section in skip or (only is not None and section not in only):
            continue
        if not isinstance(values, dict):
            raise _unknown_key(section)
        for name, value in values.items():
            _set(cfg, f"{section}.{name}", value, from_text=False, follow_moved=follow_moved)


def _read_file(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise ShardwiseError("config", f"no such file {str(path)!r}")
    return path.read_text()


def user_section(path: str | Path | None, overrides: dict[str, str], section: str):
    """One section as the user's own config file and command line give it, and nothing else,
    unvalidated (read before a checkpoint is trusted; the whole config is checked once the
    checkpoint's own config is known)."""
    cfg = Config()
    if path is not None:
        _apply_toml(cfg, _read_file(path), str(path), only=(section,))
    for key, value in overrides.items():
        if key.startswith(f"{section}."):
            _set(cfg, key, value, from_text=True)
    return getattr(cfg, section)


def load_config(
    path: str | Path | None = None, overrides: dict[str, str] | None = None, *, resumed: str | None = None
) -> Config:
    """Defaults, then `resumed` (the config.toml of a checkpoint being resumed, without
    its trust and run sections), then the TOML file, then command-line overrides; validated."""
    cfg = Config()
    if resumed is not None:
        _apply_toml(cfg, resumed, "the checkpoint's config.toml", skip=NOT_RESUMED, follow_moved=True)
    if path is not None:
        _apply_toml(cfg, _read_file(path), str(path))
    for key, value in (overrides or {}).items():
        _set(cfg, key, value, from_text=True)
    validate(cfg)
    return cfg
