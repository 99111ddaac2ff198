"""Clients for model providers, each implementing routecache.router.ports.ChatUpstream."""

from routecache.router.upstream.openai_client import OpenAIChatClient

__all__ = ["OpenAIChatClient"]
