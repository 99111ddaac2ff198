"""The replay upstream: a real OpenAI-compatible HTTP server answering from recorded answers."""

from routecache.replay.config import FaultKind, ReplayConfig, add_cli_arguments, config_from_args
from routecache.replay.recordings import Recordings
from routecache.replay.server import RunningReplayServer, serve_forever, start_replay_server

__all__ = [
    "FaultKind",
    "Recordings",
    "ReplayConfig",
    "RunningReplayServer",
    "add_cli_arguments",
    "config_from_args",
    "serve_forever",
    "start_replay_server",
]
