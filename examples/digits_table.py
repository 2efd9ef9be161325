"""Put scikit-learn's bundled digits into a database table to train on with
`data.name = "sql"`: `digits` (id, label, p0 .. p63), one row a digit.

    python examples/digits_table.py digits.db                      # an SQLite file
    python examples/digits_table.py postgresql://me@localhost/db   # a PostgreSQL database
"""

from __future__ import annotations

import sqlite3
import sys

from sklearn.datasets import load_digits


def rows() -> list[tuple]:
    bunch = load_digits()
    return [(i + 1, int(y), *map(float, x)) for i, (x, y) in enumerate(zip(bunch.data, bunch.target, strict=True))]


def main(target: str) -> None:
    pixels = ", ".join(f"p{i} DOUBLE PRECISION" for i in range(64))
    create = f"CREATE TABLE digits (id BIGINT PRIMARY KEY, label INTEGER, {pixels})"
    if target.startswith(("postgresql://", "postgres://")):
        import psycopg

        with psycopg.connect(target) as conn, conn.cursor() as cur:
            cur.execute(create)
            cur.executemany(f"INSERT INTO digits VALUES ({', '.join(['%s'] * 66)})", rows())
    else:
        conn = sqlite3.connect(target)
        with conn:
            conn.execute(create)
            conn.executemany(f"INSERT INTO digits VALUES ({', '.join('?' * 66)})", rows())
        conn.close()
    print(f"{target}: table digits, {len(rows())} rows")


if __name__ == "__main__":
    main(sys.argv[1])
