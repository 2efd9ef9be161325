"""The sections of the configuration that name what is trained on what: the model and the
data (config.py holds the rest and reads them all)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

TEXT_DATA = ("fortunes", "synthetic_text", "text_folder", "sql_text")  # TF-IDF features (data/tfidf.py)


@dataclass
class ModelConfig:
    name: str = "convnet"
    """A built-in model: mlp, convnet (conv stack then fully-connected head), resnet, or bag (an
    EmbeddingBag over a document's words, then fully-connected layers: text); or your
    own, as an import path `package.module:function`: the function gets the shape of a sample,
    the number of classes and model.options as keywords, and returns an nn.Module."""
    options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for your own model's function (a TOML table; on the command line a
    JSON object, e.g. '{"width": 64}')."""
    channels: list[int] = field(default_factory=lambda: [32, 32, 64, 64, 64])
    """Output channels of each convolution (convnet) or of each residual stage (resnet)."""
    hidden: list[int] = field(default_factory=lambda: [128, 64])
    """Widths of the hidden fully-connected layers (mlp body: none is a linear model; convnet
    head; bag: the embedding's width, then the head's)."""
    weights: str = ""
    """Start from these weights (a model.safetensors, e.g. a finished run's) instead of a
    random initialisation: fine-tuning; with train.steps = 0 they are only scored, under
    this layout (what `shardwise evaluate --nproc` runs)."""
    norm: Literal["none", "group"] = "group"
    """Normalisation after each convolution: none or group (per-sample, so any batch split gives the same result)."""


@dataclass
class DataConfig:
    name: str = "digits"
    """Data source: digits (bundled 8x8 handwritten digits), synthetic, cifar10 (binary
    batches in data.path), npz (arrays x, y in data.path), sql (a database's table, read as
    each rank trains: data.url); text, as TF-IDF features (data.vocabulary): fortunes (the Debian
    fortune files, a class per file), synthetic_text, text_folder (data.path: a sub-folder per
    class of .txt files), sql_text (data.text_column of a table); or your own, as an import
    path `package.module:function` that gets data.options as keywords and returns arrays x, y
    (and x_val, y_val) or a pair of datasets (README, "Your own data")."""
    options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for your own data's function (a TOML table; on the command line JSON)."""
    path: str = ""
    """Directory of CIFAR-10 binary batches (cifar10), the .npz file (npz) or the folder of
    text files (text_folder)."""
    encrypt_key: str = ""
    """npz: the AES-256 key file (`shardwise keygen --encryption`) data.path was sealed with (`shardwise seal`)."""
    partition: Literal["shuffle", "contiguous", "random", "stratified", "kmeans"] = "shuffle"
    """How samples are split across data-parallel ranks: shuffle (a new global permutation
    each epoch, sliced per rank) or a fixed split: contiguous, random, stratified (by label),
    kmeans (by feature similarity)."""
    shards: int | None = None
    """Number of fixed shards (default: the data-parallel degree); each rank owns shards/dp
    of them. Same shards, same global batches, whatever the layout (sql: key ranges)."""
    val_fraction: float = 0.2
    """Fraction held out for validation, stratified by label (sources without their own validation split)."""
    samples: int = 4096
    """Number of samples (synthetic) or documents (synthetic_text)."""
    shape: list[int] = field(default_factory=lambda: [3, 32, 32])
    """Shape of one sample, channels first (synthetic)."""
    classes: int = 10
    """Number of classes (synthetic, synthetic_text)."""
    url: str = ""
    """sql: sqlite:///PATH (4 slashes: absolute) or postgresql://USER@HOST:PORT/DB (a password: PGPASSWORD)."""
    table: str = ""
    """sql: the table or view whose rows are the samples (or data.query)."""
    query: str = ""
    """sql: a SELECT whose rows are the samples, in place of data.table (run again per page)."""
    key: str = "id"
    """sql: a unique integer column; rows are split, paged and hashed into validation by it."""
    label_column: str = "label"
    """sql: each row's class (integers or text); the classes are its distinct values, sorted."""
    feature_columns: list[str] = field(default_factory=list)
    """sql: the numeric input columns (default: every column but the key and the label)."""
    text_column: str = "text"
    """sql_text: the column holding each row's document."""
    vocabulary: int = 5000
    """Text: the input features are the TF-IDF weights of this many words, those in the most
    training documents (ties: alphabetical); fewer where the corpus has fewer."""
    categories: list[str] = field(default_factory=lambda: ["computers", "politics", "science", "songs-poems"])
    """fortunes: the fortune files read, one class each (in /usr/share/games/fortunes)."""
    words_per_document: int = 40
    """synthetic_text: the mean length of a generated document, in words (the corpus is the
    same for every train.seed)."""
    page_rows: int = 1024
    """sql: rows one query reads (WHERE key > last ORDER BY key LIMIT page_rows), used in a seeded order."""


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    """`shardwise serve`: the address to listen on; any but loopback needs serve.tls_cert,
    serve.tls_key and serve.token_file."""
    port: int = 8000
    """The port to listen on (0: a free one, printed)."""
    max_batch: int = 32
    """Requests' inputs are batched together up to this many samples ..."""
    max_wait_ms: float = 5.0
    """... or until the first of them has waited this long, whichever comes first."""
    tls_cert: str = ""
    """A PEM certificate (chain): serve HTTPS (with serve.tls_key)."""
    tls_key: str = ""
    """The certificate's PEM private key."""
    token_file: str = ""
    """A file of bearer tokens, one a line: every request but GET / and GET /healthz must
    carry one (Authorization: Bearer TOKEN)."""
    max_body_bytes: int = 4_194_304
    """A request body over this many bytes is refused (413) unread."""
    max_restarts: int = 3
    """--nproc N: the times the ranks are started again after one fails (the front answers
    503 meanwhile); once more, and the server stops, exit 1."""
    pipelined: bool = True
    """--parallel.pp N alone: up to N batches in flight, one a stage (a stage takes the next
    batch once it has passed the last one on); false: one batch through every stage at a time."""
    p99_ms: float = 0.0
    """--parallel.layout auto: the latency target the serving layout is chosen for (the one
    predicted to answer the most samples a second while a request waits at most this long at
    full load); 0: no target, the highest rate."""
    memory_per_rank: str = ""
    """The memory a rank may hold for the model's weights and buffers, e.g. 256MiB (empty: no
    limit): a model whose largest rank holds more under the layout asked is refused in one
    line, before it serves (cut it further: --nproc N --parallel.pp N)."""
