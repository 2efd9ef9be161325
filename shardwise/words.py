"""`shardwise words`: how often each word occurs in a corpus, and in how many documents,
counted across ranks.

Each rank reads and tokenises only its share of the documents (`data/text.py`
`load_corpus(share=...)`: a folder's files, a table's key range, a synthetic document's seed)
and counts them. Every word then belongs to one rank, the CRC-32 of its UTF-8 bytes modulo
the world size: one all-to-all of sizes and one of the encoded counts (`word\\tcount\\tdocs`
lines) bring each rank the counts of its own words from every other, which it adds up. No
raw text moves and no rank holds the whole vocabulary; the totals are exact, as each word's
are on one rank only, so the most frequent words of the corpus are the most frequent of the
ranks' own tops, which rank 0 gathers.

Outputs (in the run folder): `counts/part-RRRRR.tsv`, every word of rank R with its count and
documents, by word; `words.tsv`, the `--top` most frequent (ties: alphabetical);
`summary.json`, the corpus' documents, words and distinct words, and the time taken.
"""

from __future__ import annotations

import time
import zlib
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist

from shardwise.comm.collectives import all_gather_json
from shardwise.config import Config
from shardwise.data.text import load_corpus, words
from shardwise.files import write_atomic
from shardwise.jsonsafe import dumps


def owner(word: str, world: int) -> int:
    """The rank that adds up `word`'s counts (the same on every machine: not Python's hash)."""
    return zlib.crc32(word.encode()) % world


def count(docs: list[str]) -> tuple[Counter, Counter, int]:
    """(occurrences, documents holding it) per word, and the number of words, of `docs`."""
    occurrences, documents, tokens = Counter(), Counter(), 0
    for doc in docs:
        found = words(doc)
        tokens += len(found)
        occurrences.update(found)
        documents.update(set(found))
    return occurrences, documents, tokens


def _encode(rows: list[tuple[str, int, int]]) -> bytes:
    return "".join(f"{w}\t{c}\t{d}\n" for w, c, d in rows).encode()


def _decode(data: bytes) -> list[tuple[str, int, int]]:
    rows = []
    for line in data.decode().splitlines():
        w, c, d = line.split("\t")
        rows.append((w, int(c), int(d)))
    return rows


def exchange(occurrences: Counter, documents: Counter) -> dict[str, list[int]]:
    """This rank's own words with their counts added up over every rank: an all-to-all."""
    world, rank = dist.get_world_size(), dist.get_rank()
    outgoing: list[list[tuple[str, int, int]]] = [[] for _ in range(world)]
    for w, c in occurrences.items():
        outgoing[owner(w, world)].append((w, c, documents[w]))
    pieces = [_encode(rows) for rows in outgoing]
    send_sizes = torch.tensor([len(p) for p in pieces], dtype=torch.int64)
    recv_sizes = torch.empty_like(send_sizes)
    dist.all_to_all_single(recv_sizes, send_sizes)
    send = torch.frombuffer(bytearray(b"".join(pieces) or b"\0"), dtype=torch.uint8)[: int(send_sizes.sum())]
    recv = torch.empty(int(recv_sizes.sum()), dtype=torch.uint8)
    dist.all_to_all_single(recv, send, recv_sizes.tolist(), send_sizes.tolist())
    totals: dict[str, list[int]] = {}
    data, at = recv.numpy().tobytes(), 0
    for size in recv_sizes.tolist():
        for w, c, d in _decode(data[at : at + size]):
            entry = totals.setdefault(w, [0, 0])
            entry[0] += c
            entry[1] += d
        at += size
    assert all(owner(w, world) == rank for w in totals)
    return totals


def top_words(totals: dict[str, list[int]], k: int) -> list[tuple[str, int, int]]:
    ranked = sorted(totals.items(), key=lambda item: (-item[1][0], item[0]))[:k]
    return [(w, c, d) for w, (c, d) in ranked]


def run_words(cfg: Config, *, out_dir: Path, top: int) -> dict:
    """This rank's share of `shardwise words`; rank 0's summary (others: {})."""
    start = time.perf_counter()
    world, rank = dist.get_world_size(), dist.get_rank()
    corpus = load_corpus(cfg.data, share=(rank, world))
    occurrences, documents, tokens = count(corpus.docs)
    totals = exchange(occurrences, documents)
    part = sorted(totals.items())
    (out_dir / "counts").mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "counts" / f"part-{rank:05d}.tsv", _encode([(w, c, d) for w, (c, d) in part]))
    sums = torch.tensor([len(corpus.docs), tokens, len(totals)], dtype=torch.int64)
    dist.all_reduce(sums)
    gathered = all_gather_json(top_words(totals, top), dist.group.WORLD)  # each rank's own top: exact
    if rank != 0:
        return {}
    best = top_words({w: [c, d] for tops in gathered for w, c, d in tops}, top)
    write_atomic(out_dir / "words.tsv", "word\tcount\tdocuments\n" + _encode(best).decode())
    summary = {
        "documents": int(sums[0]),
        "words": int(sums[1]),
        "distinct_words": int(sums[2]),
        "ranks": world,
        "seconds": time.perf_counter() - start,
        "top": [{"word": w, "count": c, "documents": d} for w, c, d in best],
    }
    write_atomic(out_dir / "summary.json", dumps(summary, indent=1))
    _show(summary, out_dir)
    return summary


def _show(summary: dict, out_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table()
    for name in ("", "word", "count", "documents"):
        table.add_column(name, justify="left" if name == "word" else "right")
    for i, row in enumerate(summary["top"], 1):
        table.add_row(str(i), row["word"], f"{row['count']:,}", f"{row['documents']:,}")
    console = Console(width=100)
    console.print(f"{summary['words']:,} words in {summary['documents']:,} documents, "
                  f"{summary['distinct_words']:,} distinct, counted by {summary['ranks']} ranks")  # fmt: skip
    console.print(table)
    console.print(f"written: {out_dir / 'words.tsv'}, {out_dir / 'counts'} (every word, a part per rank)")
