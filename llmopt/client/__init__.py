"""Clients of ``llmopt serve``: :class:`Client` (blocking) and :class:`AsyncClient` (asyncio).

    with llmopt.Client("127.0.0.1:8001") as client:
        for delta in client.stream("smollm2", "Hello", chat=True):
            print(delta, end="")

The calls mirror the in-process :class:`~llmopt.runtime.Generator`: ``generate`` / ``chat``
return a :class:`~llmopt.runtime.GenerationResult`, ``stream`` iterates text deltas and then
holds the result. A failed call raises an :class:`~llmopt.errors.LlmoptError` of the type the
server raised (the mapping is :mod:`llmopt.server.status`).
"""

from __future__ import annotations

from llmopt.client._async import AsyncClient, AsyncRemoteStream
from llmopt.client._common import ModelDetails, ModelSummary, TensorInfo, Tokenized
from llmopt.client._sync import Client, RemoteStream

__all__ = ["AsyncClient", "AsyncRemoteStream", "Client", "ModelDetails", "ModelSummary",
           "RemoteStream", "TensorInfo", "Tokenized"]
