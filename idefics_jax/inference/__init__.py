"""Inference: the decode engine, cached generation, sampling, chats that keep their cache,
continuous batching, the assistant (a checkpoint with its processor), evaluation and the server."""

from idefics_jax.inference.assistant import Assistant
from idefics_jax.inference.batcher import Batcher, Request
from idefics_jax.inference.conversation import Conversation
from idefics_jax.inference.engine import DecodeState, Engine
from idefics_jax.inference.generate import Generator
from idefics_jax.inference.sampling import GREEDY, Sampling

__all__ = ["GREEDY", "Assistant", "Batcher", "Conversation", "DecodeState", "Engine", "Generator", "Request",
           "Sampling"]
