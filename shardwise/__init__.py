"""shardwise: train and serve neural networks across processes and machines."""

__version__ = "0.1.0"
