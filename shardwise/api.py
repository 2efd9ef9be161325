"""The Python API: a config in code, a run on N local processes (or as the ranks of a
torchrun job), and what it left.

    import shardwise

    cfg = shardwise.build_config({"model.name": "examples.digits_model:build", "train.steps": 200})
    result = shardwise.run(cfg, nproc=2, out="runs/mine")
    print(result.summary["val_accuracy"], result.weights)

The same script under `torchrun --nproc-per-node 2 script.py` runs as the ranks torchrun
started: every rank calls `run`, which then trains in the calling process and returns
on every rank. The command line is a thin layer over this module.
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from shardwise.config import Config, ParallelConfig, load_config
from shardwise.errors import EXIT_USAGE, ShardwiseError
from shardwise.train.outputs import PREDICTED_ENV


@dataclass(frozen=True)
class Result:
    """A finished run: its folder and its summary (summary.json)."""

    out: Path
    summary: dict

    @property
    def weights(self) -> Path:
        """The full, unsharded weights under the model's own names (safetensors)."""
        return self.out / "model.safetensors"


class RunFailed(Exception):
    """A run that did not finish: the exit status a command would give (1: a rank failed,
    130: interrupted); the launcher has printed why, in one line."""

    def __init__(self, exit_code: int):
        super().__init__(f"the run failed (exit status {exit_code}); its one-line reason is on stderr")
        self.exit_code = exit_code


def build_config(settings: dict[str, Any] | None = None, *, file: str | Path | None = None) -> Config:
    """A validated config: the defaults, then `file` (TOML), then `settings` keyed
    `section.key` with Python values (`{"train.steps": 200, "model.hidden": [64, 32]}`)."""
    return load_config(file, {key: _as_text(value) for key, value in (settings or {}).items()})


def _as_text(value: Any) -> str:
    """A Python value as the command line would give it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return "" if value is None else str(value)


def run(
    cfg: Config,
    *,
    nproc: int = 2,
    out: str | Path | None = None,
    max_restarts: int = 0,
    cluster: str = "local",
    resuming: bool = False,
    overwrite: bool = False,
) -> Result:
    """Train as `cfg` says on `nproc` processes of this machine (or the emulated cluster's
    hosts: `cluster="emulated"`), writing to `out` (default: `cfg.run.out`, else a new folder
    under runs/). Under torchrun, this process is one rank of its job and `nproc` is torchrun's.
    `overwrite` starts a run folder again (never a folder that is not one). A mistake in the
    config raises ShardwiseError; a run that fails raises RunFailed."""
    from shardwise.worker import run_rank, under_torchrun

    if under_torchrun():
        if out is not None:
            cfg.run.out = str(out)
        folder, result = run_rank(cfg)
        return Result(folder, result.summary)
    folder = out_folder(cfg, out)
    code = run_local(
        cfg, nproc=nproc, out=folder, max_restarts=max_restarts, cluster=cluster, resuming=resuming, overwrite=overwrite
    )
    if code == EXIT_USAGE:
        raise ShardwiseError("run", "a rank refused the config; its one-line reason is on stderr")
    if code != 0:
        raise RunFailed(code)
    return Result(folder, json.loads((folder / "summary.json").read_text()))


def out_folder(cfg: Config, out: str | Path | None) -> Path:
    from shardwise.train.outputs import new_run_dir

    if out is not None:
        return Path(out)
    if cfg.run.out:
        return Path(cfg.run.out)
    return new_run_dir(Path("runs"), cfg.model.name)


def run_local(
    cfg: Config,
    *,
    nproc: int,
    out: Path,
    max_restarts: int,
    cluster: str,
    resuming: bool,
    overwrite: bool = False,
    quiet: bool = False,
    least: int | None = None,
) -> int:
    """Start the ranks here (or on the emulated cluster), supervise them; the exit status.
    `least` < `nproc`: elastic, going on with no fewer than `least` when hosts are lost."""
    from shardwise.cluster.placement import placement_for
    from shardwise.elastic import Elastic
    from shardwise.launch import launch

    placement = placement_for(cluster)
    chosen = None
    if cfg.parallel.layout == "auto":
        from shardwise.plan.command import choose_layout

        chosen = choose_layout(cfg, nproc=nproc, cluster=cluster)
    if cfg.train.activation_checkpointing == "auto":  # (a planned layout has it resolved)
        from shardwise.plan.checkpointing import choose_checkpointing

        chosen = choose_checkpointing(cfg, nproc=nproc, cluster=cluster) or chosen
    if cfg.comm.compression == "auto":
        from shardwise.plan.auto_compression import choose_compression

        # the compressed step's prediction supersedes the layout's, made before the choice
        chosen = choose_compression(cfg, nproc=nproc, cluster=cluster) or chosen
    return launch(
        cfg,
        nproc=nproc,
        out=out,
        max_restarts=max_restarts,
        resuming=resuming,
        placement=placement,
        overwrite=overwrite,
        quiet=quiet,
        env={PREDICTED_ENV: _prediction(cfg, nproc, cluster, chosen)},
        elastic=Elastic(least, nproc, cfg.train.rejoin_timeout_s) if least is not None and least < nproc else None,
    )


def count_words(cfg: Config, *, nproc: int, out: Path, top: int, overwrite: bool = False) -> int:
    """`shardwise words`: the ranks count the corpus `cfg.data` names; the exit status."""
    from shardwise.launch import launch
    from shardwise.procs import JOB_ENV

    return launch(cfg, nproc=nproc, out=out, overwrite=overwrite, env={JOB_ENV: f"words:{top}"})


def serve_on_ranks(run: str | Path, texts: dict[str, str], *, nproc: int, cluster: str = "local") -> int:
    """`shardwise serve RUN --nproc N`: the run's model cut into the layout `texts` name across
    `nproc` ranks placed as `cluster` says (serve/ranks.py), behind an HTTP front in this
    process that outlives them: a failed rank's job is restarted (serve.max_restarts) while the front
    answers 503 (serve/link.py); the exit status."""
    import threading

    from shardwise.cluster.placement import placement_for
    from shardwise.launch import launch
    from shardwise.procs import JOB_ENV
    from shardwise.scoring import run_record
    from shardwise.serve.front import check_door, listen, listen_and_serve
    from shardwise.serve.link import RankLink
    from shardwise.serve.model import ServedModel, check_memory, describe

    folder, cfg = _serving_run(run, texts)
    cfg.parallel = _serving_layout(cfg, texts)
    record = run_record(folder)
    placement = placement_for(cluster)
    door = check_door(cfg.serve)
    sock = listen(cfg.serve.host, cfg.serve.port)  # taken now: a port in use is one line before any rank starts
    work, link, stop, server = Path(tempfile.mkdtemp(prefix="shardwise-serve-")), RankLink(), threading.Event(), []
    refused: list[ShardwiseError] = []

    def ranks() -> None:
        status = 1
        try:
            status = launch(cfg, nproc=nproc, out=work / "serve", max_restarts=cfg.serve.max_restarts,
                            placement=placement, env={JOB_ENV: f"serve:{folder.resolve()}", **link.env()},
                            stop=stop)  # fmt: skip
        except ShardwiseError as e:  # the launcher's checks, before any rank starts: said in one line, exit 2
            refused.append(e)
        finally:
            link.launcher_ended(status)
            if server and not stop.is_set():  # the ranks failed more often than they may restart: stop
                server[0].should_exit = True

    supervising = threading.Thread(target=ranks, name="shardwise-serve-launcher")
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _stopped_starting) if main else None  # until the front takes it
    launched = False
    try:
        cfg = _serving_config(cfg, folder, record, work, nproc, cluster)
        launched = True
        supervising.start()
        hello = link.wait_ready()
        if hello is None:
            sock.close()
            if refused:
                raise refused[0]
            return link.ended
        about = describe(folder, cfg, record, parameters=hello["parameters"], held=hello["held_bytes"],
                         layout=hello["layout"])  # fmt: skip
        check_memory(cfg.serve.memory_per_rank, hello["held_bytes"], hello["layout"])
        served = ServedModel(cfg.model.name, link.forward, record, about, ready=link.ready,
                             in_flight=hello.get("in_flight", 1))  # fmt: skip
        listen_and_serve(served, cfg.serve, door=door, sock=sock, started=server.append)
    except StoppedStarting:
        print("shardwise serve: stopped before serving", file=sys.stderr)
        return 0
    finally:
        if main:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # already stopping: nothing may cut the clean-up short
        link.close()  # rank 0 sees the link close, and stops the ranks
        _join(supervising, launched, timeout=10)
        stop.set()  # any left (rank 0 never connected, or would not stop)
        _join(supervising, launched)
        sock.close()
        shutil.rmtree(work, ignore_errors=True)
        if main:
            signal.signal(signal.SIGTERM, previous)
    if link.ended:
        return link.ended
    print("shardwise serve: stopped", file=sys.stderr)
    return 0


def _serving_config(cfg: Config, folder: Path, record: dict, work: Path, nproc: int, cluster: str) -> Config:
    """The run's config as the serving ranks take it (a stand-in for its data in `work`), its
    layout chosen where parallel.layout is auto."""
    from shardwise.serve.model import serving_config

    cfg = serving_config(cfg, folder, record, work / "stand-in.npz")
    if cfg.parallel.layout == "auto":
        from shardwise.plan.serving import choose_serving_layout

        choose_serving_layout(cfg, nproc=nproc, cluster=cluster, record=record)
    return cfg


class StoppedStarting(Exception):
    """SIGTERM before the serving front takes it over: the ranks started are stopped."""


def _stopped_starting(signum, frame) -> None:
    raise StoppedStarting


def _join(thread, launched: bool, timeout: float | None = None) -> None:
    """Wait for `thread` where it was started (a SIGTERM may have cut its start short)."""
    if launched:
        try:
            thread.join(timeout=timeout)
        except RuntimeError:  # never started
            pass


def _serving_layout(cfg: Config, texts: dict[str, str]) -> ParallelConfig:
    """The layout `cfg` is served under, or one line for one serving cannot take: a run
    trained under a pipeline schedule of several stages a rank is served one stage a rank
    (a batch a stage)."""
    if cfg.parallel.mode == "ps":
        raise ShardwiseError("parallel.mode", "=ps trains through parameter servers: serve under an all-reduce "
                             "layout (dp, tp, pp, spatial, vertical)")  # fmt: skip
    if "parallel.schedule" in texts or "parallel.virtual_stages" in texts:
        raise ShardwiseError("parallel.schedule", "is a training schedule: a served pipeline runs a batch a stage, "
                             "one stage a rank (leave parallel.schedule and parallel.virtual_stages out)")  # fmt: skip
    return replace(cfg.parallel, schedule=ParallelConfig().schedule, virtual_stages=None)


def _serving_run(run: str | Path, texts: dict[str, str]) -> tuple[Path, Config]:
    """The run folder and its config for serving; under --parallel.layout auto, with none of
    the run's own layout (the planner chooses), and none named beside auto."""
    from shardwise.scoring import open_run

    if texts.get("parallel.layout") != "auto":
        return open_run(run, texts)
    # the command line's own parallel.* alone, through the config's check of auto beside a degree
    named = load_config(None, {k: v for k, v in texts.items() if k.startswith("parallel.")}).parallel
    folder, cfg = open_run(run, {k: v for k, v in texts.items() if k != "parallel.layout"})
    cfg.parallel = named
    return folder, cfg


def _prediction(cfg: Config, nproc: int, cluster: str, chosen: dict | None = None) -> str:
    """The cost model's step and peak memory for this layout (`chosen`: already predicted,
    by the planner's choice), as JSON for the ranks (rank 0 sets them beside the measured
    ones in summary.json); why there is none, where not."""
    from shardwise.plan.command import predicted_step

    if cfg.train.steps == 0:
        return json.dumps({"none": "no training step to predict"})
    try:
        return json.dumps(chosen or predicted_step(cfg, nproc=nproc, cluster=cluster))
    except ShardwiseError as e:  # a model the planner cannot cut into layers
        return json.dumps({"none": f"the cost model cannot profile this model: {e}"})


def evaluate(run: str | Path, settings: dict[str, Any] | None = None, *, nproc: int = 1) -> dict[str, float]:
    """Score a finished run's weights (model.safetensors) on its validation set, or on the
    data `settings` name (`{"data.name": "npz", "data.path": ...}`): {"val_loss",
    "val_accuracy"}. In this process; or, with `nproc` > 1 or `parallel.*` settings, on
    `nproc` ranks under that layout (the weights cut as a layout cuts a model). A model or
    data import path in the run's config is followed only where `settings` names the same
    one: a run folder cannot choose the code it runs."""
    from shardwise import scoring

    texts = _texts(settings)
    if not _under_layout(texts, nproc):
        return scoring.evaluate(run, texts)
    folder, cfg = scoring.open_run(run, texts)
    summary, _ = _scoring_job(cfg, folder, nproc, "evaluate")
    return {"val_loss": summary["val_loss"], "val_accuracy": summary["val_accuracy"]}


def predict(
    run: str | Path, inputs: str | Path, out: str | Path, settings: dict[str, Any] | None = None, *, nproc: int = 1
) -> dict:
    """Class probabilities of a finished run's model for new `inputs` (an .npz with raw
    samples `x`, as the run's source gives them, or a folder of images) written to `out`
    (.csv or .npz), preprocessed as the run's training data was (the record saved in
    model.safetensors). In this process, or on `nproc` ranks under the layout `settings`
    names. Returns {"inputs", "out", "classes"}."""
    from shardwise import scoring

    texts = _texts(settings)
    new = scoring.new_inputs(run, inputs, out, texts)
    if not _under_layout(texts, nproc):
        return scoring.write_predictions(new, scoring.predict(new))
    _, probs = _scoring_job(new.cfg, new.folder, nproc, "predict", new=new)
    return scoring.write_predictions(new, probs)


def _texts(settings: dict[str, Any] | None) -> dict[str, str]:
    return {key: _as_text(value) for key, value in (settings or {}).items()}


def _under_layout(texts: dict[str, str], nproc: int) -> bool:
    return nproc != 1 or any(key.startswith("parallel.") for key in texts)


def _scoring_job(cfg: Config, folder: Path, nproc: int, what: str, *, new=None) -> tuple[dict, Any]:
    """The run's weights on `nproc` ranks under `cfg`'s layout for no step: the summary (its
    validation score) and, with `new` inputs, their class probabilities (the inputs are the
    job's validation set; its training split, never stepped on, is them again, to a batch)."""
    import numpy as np

    from shardwise.config import DataConfig

    if cfg.parallel.mode != "allreduce":
        raise ShardwiseError("parallel.mode", f"={cfg.parallel.mode}: runs are scored under all-reduce layouts")
    cfg.model.weights = str((folder / "model.safetensors").resolve())
    cfg.train.steps, cfg.train.checkpoint_every, cfg.run.resume, cfg.run.timeline = 0, 0, "", False
    scratch = Path(tempfile.mkdtemp(prefix="shardwise-score-"))  # kept where a rank failed: its logs
    try:
        if new is not None:
            n, labels = max(len(new.x), cfg.train.batch_size), np.zeros(len(new.x), dtype=np.int64)
            x_train = np.resize(new.x, (n, *new.x.shape[1:]))
            arrays = {"x": x_train, "y": np.resize(labels, n), "x_val": new.x, "y_val": labels}
            np.savez(scratch / "inputs.npz", **arrays, classes=np.array(new.record["classes"]))
            cfg.data = DataConfig(name="npz", path=str(scratch / "inputs.npz"))
            cfg.run.predictions = str(scratch / "probabilities.npy")
        code = run_local(
            cfg, nproc=nproc, out=scratch / "run", max_restarts=0, cluster="local", resuming=False, quiet=True
        )
        if code == EXIT_USAGE:
            raise ShardwiseError(what, "a rank refused the config; its one-line reason is on stderr")
    except ShardwiseError:
        shutil.rmtree(scratch)
        raise
    if code != 0:
        raise RunFailed(code)
    summary = json.loads((scratch / "run" / "summary.json").read_text())
    probs = np.load(scratch / "probabilities.npy") if new is not None else None
    shutil.rmtree(scratch)
    return summary, probs
