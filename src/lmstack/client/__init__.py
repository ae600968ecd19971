"""How apps reach models: the `LLMClient` protocol, in-process (`LocalClient`) or by HTTP (`OpenAIClient`)."""

from lmstack.client.base import Completion, Conversation, GenParams, LLMClient, Message, TokenLogprob, Usage
from lmstack.client.cache import DiskCache, request_key
from lmstack.client.local import LocalClient
from lmstack.client.openai_client import OpenAIClient

__all__ = ["Completion", "Conversation", "DiskCache", "GenParams", "LLMClient", "LocalClient", "Message",
           "OpenAIClient", "TokenLogprob", "Usage", "request_key"]
