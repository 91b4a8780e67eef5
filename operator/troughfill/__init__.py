"""troughfill: offline LLM batch inference in the GPU capacity that online serving leaves idle."""

__version__ = "0.1.0"
