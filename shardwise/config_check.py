"""Checks of config values: a value's type against its field (TOML, or command-line
text converted), and the ranges and combinations that need no world size or data.
Nothing here imports torch."""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from typing import TYPE_CHECKING, Any, Literal

from shardwise.comm.methods import METHODS
from shardwise.config_sections import TEXT_DATA
from shardwise.errors import ShardwiseError

if TYPE_CHECKING:
    from shardwise.config import Config

UNITS = {"": 2**20, "k": 2**10, "kib": 2**10, "m": 2**20, "mib": 2**20, "g": 2**30, "gib": 2**30}


def parse_bytes(text: str, key: str = "memory-per-rank") -> float:
    """`512MiB`, `2GiB`, `1.5g` or a number of MiB."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in UNITS:
        raise ShardwiseError(key, f"{text!r}: expected a size such as 512MiB or 2GiB")
    return float(match.group(1)) * UNITS[match.group(2).lower()]


def describe_type(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(str(a) for a in typing.get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " | ".join(describe_type(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {describe_type(typing.get_args(tp)[0])}"
    if origin is dict:
        return "table"
    return "none" if tp is type(None) else tp.__name__


def coerce(key: str, tp: Any, value: Any, from_text: bool) -> Any:
    """Check (TOML) or convert (command line text) one value against its field type."""
    origin = typing.get_origin(tp)
    bad = ShardwiseError(key, f"expected {describe_type(tp)}, got {value!r}")
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(tp)
        if type(None) in args and (value is None or (from_text and str(value).lower() in ("", "none"))):
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(key, arg, value, from_text)
            except ShardwiseError:
                pass
        raise bad
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ShardwiseError(key, f"expected one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    if origin is dict:
        if from_text:
            try:
                value = json.loads(str(value)) if str(value).strip() else {}
            except ValueError:
                example = '{"width": 64}'
                raise ShardwiseError(key, f"expected a JSON object such as '{example}', got {value!r}") from None
        if not isinstance(value, dict) or not all(_plain(v) for v in value.values()):
            raise ShardwiseError(key, f"expected a table of numbers, strings, booleans and lists, got {value!r}")
        return dict(value)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if from_text:
            value = [v for v in str(value).replace(" ", "").strip("[]").split(",") if v]  # 1,2 or [1,2]
        if not isinstance(value, list):
            raise bad
        return [coerce(key, inner, v, from_text) for v in value]
    if tp is bool:
        if from_text and str(value).lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return str(value).lower() in ("true", "1", "yes", "on")
        if isinstance(value, bool):
            return value
        raise bad
    if tp in (int, float):
        if from_text:
            try:
                return tp(str(value))
            except ValueError:
                raise bad from None
        accepted = (int, float) if tp is float else int  # TOML's 1 is a fine float, 1.0 no int
        if isinstance(value, accepted) and not isinstance(value, bool):
            return tp(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        if from_text:
            return str(value)
        raise bad
    raise AssertionError(f"unsupported field type {tp} for {key}")


def _plain(value: Any) -> bool:
    """A value a TOML table can hold (no null, no nested table: what model.options passes on)."""
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    return isinstance(value, (bool, int, float, str))


BUILT_IN_MODELS = ("mlp", "convnet", "resnet", "bag")
BUILT_IN_DATA = ("digits", "synthetic", "cifar10", "npz", "sql", *TEXT_DATA)
IMPORT_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")


def validate(cfg: Config) -> None:
    """Value checks that need no knowledge of the world size or the data."""
    t, d = cfg.train, cfg.data

    def positive(key: str, value: float) -> None:
        if value <= 0:
            raise ShardwiseError(key, f"must be positive, got {value}")

    for key in ("batch_size", "grad_accum", "lr", "log_every", "step_every", "adam_eps"):
        positive(f"train.{key}", getattr(t, key))
    if t.steps < 0 or (t.steps == 0 and not cfg.model.weights):
        raise ShardwiseError(
            "train.steps", f"must be positive (0 only scores the weights model.weights names), got {t.steps}"
        )
    for key in ("warmup_steps", "eval_every", "weight_decay", "clip_norm", "momentum", "rejoin_timeout_s"):
        if getattr(t, key) < 0:
            raise ShardwiseError(f"train.{key}", f"must be >= 0, got {getattr(t, key)}")
    if not 0.0 < d.val_fraction < 1.0:
        raise ShardwiseError("data.val_fraction", f"must be between 0 and 1, got {d.val_fraction}")
    for f in dataclasses.fields(cfg.parallel):  # every degree and count of the layout
        value = getattr(cfg.parallel, f.name)
        if isinstance(value, int) and not isinstance(value, bool):
            positive(f"parallel.{f.name}", value)
    positive("train.collective_timeout_s", t.collective_timeout_s)
    positive("train.max_bad_steps", t.max_bad_steps)
    if t.keep_checkpoints < 0:
        raise ShardwiseError("train.keep_checkpoints", f"must be >= 0, got {t.keep_checkpoints}")
    if t.checkpoint_every < 0:
        raise ShardwiseError("train.checkpoint_every", f"must be >= 0, got {t.checkpoint_every}")
    _check_ps(cfg)
    if t.memory_per_rank and parse_bytes(t.memory_per_rank, "train.memory_per_rank") <= 0:
        raise ShardwiseError("train.memory_per_rank", f"must be positive, got {t.memory_per_rank!r}")
    _check_vertical(cfg)
    _check_auto(cfg.parallel)
    _check_comm(cfg)
    _check_sql(cfg)
    if d.shards is not None:
        positive("data.shards", d.shards)
        if d.partition == "shuffle" and d.name != "sql":
            raise ShardwiseError("data.shards", f"={d.shards} needs a fixed data.partition, not shuffle")
    if d.encrypt_key and d.name != "npz":
        raise ShardwiseError("data.encrypt_key", f"is for data.name=npz (a file shardwise seal made), not {d.name}")
    if d.name in ("cifar10", "npz", "text_folder") and not d.path:
        raise ShardwiseError("data.path", f"is required for data.name={d.name}")
    positive("data.samples", d.samples)
    positive("data.classes", d.classes)
    if not d.shape or any(s <= 0 for s in d.shape):
        raise ShardwiseError("data.shape", f"must be positive sizes, got {d.shape}")
    _check_data_name(d)
    _check_text(cfg)
    _check_serve(cfg.serve)
    if cfg.run.predictions and cfg.parallel.mode == "ps":
        raise ShardwiseError("run.predictions", "are written under all-reduce layouts, not parallel.mode=ps")
    if cfg.run.profile and cfg.parallel.mode == "ps":
        raise ShardwiseError("run.profile", "profiles the all-reduce layouts' loop, not parallel.mode=ps")
    if t.precision == "bf16" and t.dtype != "float32":
        raise ShardwiseError(
            "train.precision", f"bf16 keeps float32 master weights: needs train.dtype=float32, not {t.dtype}"
        )
    name = cfg.model.name
    if name not in BUILT_IN_MODELS and not IMPORT_PATH.match(name):
        raise ShardwiseError(
            "model.name",
            f"unknown model {name!r}: a built-in ({', '.join(BUILT_IN_MODELS)}) or an import path "
            "package.module:function",
        )
    if cfg.model.options and name in BUILT_IN_MODELS:
        raise ShardwiseError("model.options", f"are for your own model's function; {name} takes none")
    if any(h <= 0 for h in cfg.model.hidden) or (not cfg.model.hidden and name not in ("mlp", "convnet")):
        raise ShardwiseError(
            "model.hidden", f"must be positive widths (mlp: none is a linear model), got {cfg.model.hidden}"
        )
    if not cfg.model.channels or any(c <= 0 for c in cfg.model.channels):
        raise ShardwiseError("model.channels", f"must be positive widths, got {cfg.model.channels}")


def _check_data_name(d) -> None:
    if d.name not in BUILT_IN_DATA and not IMPORT_PATH.match(d.name):
        raise ShardwiseError(
            "data.name",
            f"unknown data {d.name!r}: a built-in source ({', '.join(BUILT_IN_DATA)}) or an import path "
            "package.module:function",
        )
    if d.options and d.name in BUILT_IN_DATA:
        raise ShardwiseError("data.options", f"are for your own data's function; {d.name} takes none")


def _check_auto(p) -> None:
    if p.layout != "auto":
        return
    named = {f"parallel.{k}": getattr(p, k) for k in ("tp", "pp", "spatial", "vertical") if getattr(p, k) != 1}
    named |= {f"parallel.{k}": getattr(p, k) for k in ("dp", "microbatches") if getattr(p, k) is not None}
    named |= {"parallel.shard": p.shard} if p.shard != "none" else {}
    named |= {"parallel.mode": p.mode} if p.mode != "allreduce" else {}
    if named:
        key, value = next(iter(named.items()))
        raise ShardwiseError(
            key, f"={value} with parallel.layout=auto: the planner chooses the layout; name one or the other"
        )


def uncompressed_because(*, shard: str, ps: bool, method: str = "auto") -> tuple[str, str]:
    """(the setting, the reason) where a layout cannot average its gradients through
    `method` (auto: through the compressor the cost model prices), ("", "") where it can
    (config_check refuses a named method there; auto picks none)."""
    if shard == "full":
        return "parallel.shard=full", "FSDP2 reduce-scatters its gradients uncompressed"
    if ps and method not in ("bf16", "fp16"):
        why = "a parameter server's pushes go whole or in half precision (name bf16 or fp16)"
        if method in ("int8", "topk", "powersgd"):
            why += ": error feedback would keep residuals on its workers, which its checkpoints do not hold"
        return "parallel.mode=ps", why
    return "", ""


def _check_candidates(cfg: Config) -> None:
    """comm.candidates: methods a layout can average through, comm.compression among them."""
    c = cfg.comm
    if not c.candidates:
        return
    wrong = [m for m in c.candidates if m not in METHODS]
    if wrong or len(set(c.candidates)) != len(c.candidates):
        raise ShardwiseError("comm.candidates", f"{c.candidates}: each once, each one of {', '.join(METHODS)}")
    if c.compression not in (*c.candidates, "auto"):
        raise ShardwiseError("comm.candidates", f"{c.candidates} must include comm.compression={c.compression}")
    setting, why = uncompressed_because(shard=cfg.parallel.shard, ps=cfg.parallel.mode == "ps")
    if setting:  # (a parameter server's pushes are not timed method by method)
        raise ShardwiseError("comm.candidates", f"with {setting}: {why}")


def _check_comm(cfg: Config) -> None:
    c = cfg.comm
    if not 0 < c.topk_ratio <= 1:
        raise ShardwiseError("comm.topk_ratio", f"must be in (0, 1], got {c.topk_ratio}")
    if c.powersgd_rank < 1:
        raise ShardwiseError("comm.powersgd_rank", f"must be >= 1, got {c.powersgd_rank}")
    if c.warmup_steps < 0:
        raise ShardwiseError("comm.warmup_steps", f"must be >= 0, got {c.warmup_steps}")
    if c.min_bucket_bytes < 0:
        raise ShardwiseError("comm.min_bucket_bytes", f"must be >= 0, got {c.min_bucket_bytes}")
    _check_candidates(cfg)
    if c.compression in ("none", "auto"):  # auto picks none where no method applies
        return
    setting, why = uncompressed_because(shard=cfg.parallel.shard, ps=cfg.parallel.mode == "ps", method=c.compression)
    if setting:
        hint = "; use parallel.shard=none or optimizer" if setting.startswith("parallel.shard") else ""
        raise ShardwiseError("comm.compression", f"={c.compression} with {setting}: {why}{hint}")
    if cfg.parallel.mode == "ps" and c.warmup_steps:  # (the method is bf16 or fp16 here)
        raise ShardwiseError(
            "comm.warmup_steps",
            f"={c.warmup_steps} with parallel.mode=ps: a parameter server's pushes are rounded from the first step",
        )


SQL_FIELDS = ("url", "table", "query", "feature_columns")


def _check_sql(cfg: Config) -> None:
    d = cfg.data
    if d.name not in ("sql", "sql_text"):
        named = [f"data.{k}" for k in SQL_FIELDS if getattr(d, k)]
        if named:
            raise ShardwiseError(named[0], f"is for data.name=sql or sql_text, not {d.name}")
        return
    if not d.url:
        raise ShardwiseError(
            "data.url", f"is required for data.name={d.name} (sqlite:///PATH or postgresql://USER@HOST/DB)"
        )
    if bool(d.table) == bool(d.query):
        raise ShardwiseError("data.table", f"name one of data.table and data.query for data.name={d.name}")
    if d.page_rows <= 0:
        raise ShardwiseError("data.page_rows", f"must be positive, got {d.page_rows}")
    if d.name == "sql_text":
        if d.feature_columns:
            raise ShardwiseError("data.feature_columns", "are for data.name=sql; sql_text reads data.text_column")
        return
    if d.partition not in ("shuffle", "contiguous"):
        raise ShardwiseError(
            "data.partition", f"={d.partition}: an SQL table is split by key ranges (contiguous), read page by page"
        )
    if cfg.parallel.spatial > 1:
        raise ShardwiseError("parallel.spatial", f"={cfg.parallel.spatial}: an SQL table's rows are flat features")


def _check_ps(cfg: Config) -> None:
    """The parameter server's settings."""
    ps = cfg.ps
    if ps.staleness < 0:
        raise ShardwiseError("ps.staleness", f"must be >= 0, got {ps.staleness}")
    if ps.slow_factor < 1.0:
        raise ShardwiseError("ps.slow_factor", f"must be >= 1 (a factor of slowness), got {ps.slow_factor}")
    if ps.staleness > 0 and not ps.asynchronous:
        raise ShardwiseError(
            "ps.staleness", f"={ps.staleness} needs ps.asynchronous=true (synchronous workers are never ahead)"
        )
    if cfg.parallel.colocate and cfg.parallel.mode != "ps":
        raise ShardwiseError(
            "parallel.colocate", f"=true needs parallel.mode=ps (a parameter server), got {cfg.parallel.mode}"
        )


def _check_vertical(cfg: Config) -> None:
    v = cfg.parallel
    if any(c < 0 for c in v.feature_cost):
        raise ShardwiseError("parallel.feature_cost", f"costs must be >= 0, got {min(v.feature_cost)}")
    if v.feature_cost and v.vertical_split != "balanced":
        raise ShardwiseError("parallel.feature_cost", "is only used with parallel.vertical_split=balanced")
    if v.vertical > 1 and cfg.model.name in ("convnet", "resnet") and v.vertical_unit != "channel":
        raise ShardwiseError(
            "parallel.vertical_unit",
            f"{cfg.model.name}'s first layer is a convolution, which needs whole channels: set "
            f"parallel.vertical_unit=channel, not {v.vertical_unit} (a split over pixels is spatial partitioning)",
        )
    if v.vertical > 1 and cfg.model.name == "bag":
        raise ShardwiseError(
            "parallel.vertical",
            f"={v.vertical} with model.name=bag: the bag's table is not split by words yet "
            "(the linear model and the mlp are)",
        )
    if v.vertical > 1 and cfg.data.partition == "kmeans":
        raise ShardwiseError(
            "data.partition",
            f"kmeans clusters on all features, but with parallel.vertical={v.vertical} each rank holds only its own",
        )


def _check_text(cfg: Config) -> None:
    d = cfg.data
    for key in ("vocabulary", "words_per_document"):
        if getattr(d, key) <= 0:
            raise ShardwiseError(f"data.{key}", f"must be positive, got {getattr(d, key)}")
    if cfg.data.name not in TEXT_DATA:
        return
    plain = all(c and "/" not in c and not c.startswith(".") for c in d.categories)
    if d.name == "fortunes" and (not d.categories or len(set(d.categories)) != len(d.categories) or not plain):
        raise ShardwiseError("data.categories", f"must name distinct fortune files, got {d.categories}")
    if cfg.parallel.spatial > 1:
        raise ShardwiseError("parallel.spatial", f"={cfg.parallel.spatial}: a document's features are flat")
    if cfg.parallel.vertical > 1 and cfg.parallel.vertical_unit != "feature":
        raise ShardwiseError(
            "parallel.vertical_unit", f"={cfg.parallel.vertical_unit}: text is split by words (feature)"
        )


def _check_serve(s) -> None:
    if s.max_batch < 1:
        raise ShardwiseError("serve.max_batch", f"must be positive, got {s.max_batch}")
    if not 0 <= s.max_wait_ms <= 60_000:
        raise ShardwiseError("serve.max_wait_ms", f"must be between 0 and 60000, got {s.max_wait_ms}")
    if not 0 <= s.p99_ms <= 3_600_000:
        raise ShardwiseError("serve.p99_ms", f"must be between 0 (no target) and 3600000, got {s.p99_ms}")
    if s.max_restarts < 0:
        raise ShardwiseError("serve.max_restarts", f"must be >= 0, got {s.max_restarts}")
    if s.max_body_bytes < 1:
        raise ShardwiseError("serve.max_body_bytes", f"must be positive, got {s.max_body_bytes}")
    if s.memory_per_rank and parse_bytes(s.memory_per_rank, "serve.memory_per_rank") <= 0:
        raise ShardwiseError("serve.memory_per_rank", f"must be positive, got {s.memory_per_rank!r}")
    if not 0 <= s.port <= 65535:
        raise ShardwiseError("serve.port", f"must be a port number 0-65535, got {s.port}")
    if bool(s.tls_cert) != bool(s.tls_key):
        key = "serve.tls_cert" if s.tls_key else "serve.tls_key"
        raise ShardwiseError(key, "name both serve.tls_cert and serve.tls_key (HTTPS needs the pair)")
