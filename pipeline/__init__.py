"""itmkit data pipeline: dataset ingest, caption parsing, vocabulary and shard I/O."""

try:
    from importlib.metadata import PackageNotFoundError, version

    __version__ = version("itmkit")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+src"
