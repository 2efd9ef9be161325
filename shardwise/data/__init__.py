"""Data sources, partitioners and the per-rank view of the training set."""

from shardwise.data.loader import RankData, build_rank_data
from shardwise.data.sources import Dataset, check_source, load_source

__all__ = ["Dataset", "RankData", "build_rank_data", "check_source", "load_source"]
