"""Data: packed token shards (tokens.py) and the cleaning/filtering/dedup pipeline."""
