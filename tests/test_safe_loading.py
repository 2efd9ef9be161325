"""Only safetensors and JSON are ever loaded: no pickle, no torch.load in the package, and no
*_object collective (those pickle what they carry)."""

import re
from pathlib import Path

import shardwise

FORBIDDEN = re.compile(
    r"torch\.load\(|import pickle|from pickle|pickle\.loads?\(|weights_only\s*=\s*False|allow_pickle\s*=\s*True"
    r"|_object\("
)


def test_package_never_unpickles():
    root = Path(shardwise.__file__).parent
    files = sorted(root.rglob("*.py"))
    assert len(files) > 10
    hits = [
        f"{f.relative_to(root)}:{i}"
        for f in files
        for i, line in enumerate(f.read_text().splitlines(), 1)
        if FORBIDDEN.search(line)
    ]
    assert hits == []
