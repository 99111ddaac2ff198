"""routecache: a gRPC service that answers LLM chat requests from a semantic cache or routes
them to a cheap or a strong model, and validates every answer before it leaves."""

__version__ = "0.1.0"
