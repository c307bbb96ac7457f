"""Pipecat's Deepgram STT is built per call without a TLS context of its own."""

from __future__ import annotations

import deepgram.base_client
from pipecat.services.deepgram.stt import DeepgramSTTService

from bot.pipeline import _one_deepgram_http_client


def _http_client(service: DeepgramSTTService) -> object:
    return service._client._client_wrapper.httpx_client.httpx_client  # unused by streaming


def test_calls_share_one_deepgram_http_client() -> None:
    make_default = deepgram.base_client._make_default_async_client
    with _one_deepgram_http_client():
        a = DeepgramSTTService(api_key="k", base_url="ws://127.0.0.1:9/v1/listen")
        b = DeepgramSTTService(api_key="k", base_url="ws://127.0.0.1:9/v1/listen")
    assert _http_client(a) is _http_client(b)
    assert deepgram.base_client._make_default_async_client is make_default  # put back
    # Outside the block the SDK makes its own again (what Pipecat does per call).
    c = DeepgramSTTService(api_key="k", base_url="ws://127.0.0.1:9/v1/listen")
    assert _http_client(c) is not _http_client(a)
