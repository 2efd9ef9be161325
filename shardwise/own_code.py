"""Your own code, named by an import path `package.module:function` (model.name,
data.name): imported by every rank, its failures said in one line naming the key."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from typing import Any

from shardwise.errors import ShardwiseError
from shardwise.procs import with_working_folder


def is_import_path(name: str) -> bool:
    return ":" in name


def import_function(path: str, key: str) -> Callable:
    """The function `package.module:function` names, or one line saying why not."""
    module_name, _, name = path.partition(":")
    with_working_folder()
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        where = "run from the folder that holds it, or install it"
        raise ShardwiseError(key, f"{path}: cannot import {module_name!r} ({e}); {where}") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise ShardwiseError(key, f"{path}: {module_name} has no function {name!r}")
    return function


def call_own(path: str, key: str, shown: str, *args: Any, **kwargs: Any) -> Any:
    """Import and call the user's function; what it raises comes back as one line naming
    `key`, the call (`shown`: how the arguments read) and the error."""
    function = import_function(path, key)
    try:
        return function(*args, **kwargs)
    except Exception as e:  # the user's function: its error in one line, with where it came from
        raise ShardwiseError(key, f"{path}({shown}) raised {type(e).__name__}: {e}") from None


def check_import_path(path: str, key: str) -> None:
    """Refuse, before any rank starts, an import path whose module cannot be found (found,
    it is imported by the ranks themselves: it may need torch)."""
    if ":" not in path:
        return
    module = path.partition(":")[0]
    with_working_folder()
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError) as e:
        found, why = False, f" ({e})"
    else:
        why = ""
    if not found:
        raise ShardwiseError(
            key, f"{path}: no module {module!r}{why}; run from the folder that holds it, or install it"
        )
