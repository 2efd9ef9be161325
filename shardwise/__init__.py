"""shardwise: train and serve neural networks across processes and machines.

    import shardwise
    result = shardwise.run(shardwise.build_config({"model.name": "mlp"}), nproc=2)

See shardwise.api for the whole of the Python API.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # the API on first use: `import shardwise` stays light (no torch) for the command line
    if name in ("build_config", "run", "Result", "RunFailed"):
        from shardwise import api

        return getattr(api, name)
    raise AttributeError(f"module 'shardwise' has no attribute {name!r}")
