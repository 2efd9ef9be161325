"""`shardwise bench sql` at a small size: every figure is there, and what vertical ranks
fetch falls with their number while a row store's file reads do not."""

from __future__ import annotations

from shardwise.bench import sql
from shardwise.bench.common import Bench, bench_console
from shardwise.cluster.placement import Placement


def test_the_sql_bench_measures_each_database(tmp_path):
    b = Bench("loopback", Placement(), 2, tmp_path, bench_console(), options={"sql_rows": 4096})
    sql.run(b)
    found = {r["measure"]: r for r in b.results}
    for db in ("sqlite", "postgresql"):
        for dp in (1, 2, 4):
            assert found[f"{db}: rows/s a rank, {dp} reading"]["median"] > 0
        assert (
            found[f"{db}: keyset paging, rows/s"]["median"] > 0 and found[f"{db}: offset paging, rows/s"]["median"] > 0
        )
    # PostgreSQL sends a rank its own columns: fewer with more vertical ranks (the key, the
    # label and each row's framing stay); SQLite reads whole rows from its file (a row store)
    link = [found[f"postgresql: vertical {v}, link bytes a row"]["median"] for v in (1, 2, 4)]
    assert link[0] > 1.6 * link[1] > 1.6 * 1.6 * link[2] > 0, link
    files = [found[f"sqlite: vertical {v}, file bytes a row"]["median"] for v in (1, 4)]
    assert abs(files[1] - files[0]) < 0.1 * files[0] and files[0] > (64 + 2) * 8, files
