"""/v1/embeddings: the engine computes the vectors (its sentence encoder, e.g. all-MiniLM-L6-v2, else the
served model's mean-pooled hidden states); this process only tokenizes and formats."""

from __future__ import annotations

import base64
import struct
from typing import Any

from tokenizers import Tokenizer

from pagoda.engine.frontend.core_client import EngineClient
from pagoda.engine.frontend.errors import EngineDeadError, RequestRejected
from pagoda.server import serving
from pagoda.server.errors import APIError
from pagoda.server.protocol import EmbeddingRequest, prompt_items


def _encode(vector: list[float], fmt: str) -> list[float] | str:
    if fmt == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


class Embedder:
    def __init__(self, client: EngineClient) -> None:
        info, tokenizer = client.info, client.tokenizer
        assert info is not None and tokenizer is not None
        self.client = client
        if info.encoder is None:
            self.name, self.dimensions = info.model_name, info.hidden_size
            self._tokenize = tokenizer.encode
        else:
            self.name, self.dimensions = info.encoder.name, info.encoder.dimensions
            encoder_tokenizer = Tokenizer.from_str(info.encoder.tokenizer_json)
            encoder_tokenizer.no_truncation()  # an input over the encoder's length is refused, never cut
            encoder_tokenizer.no_padding()
            self._tokenize = lambda text: encoder_tokenizer.encode(text).ids

    async def respond(self, req: EmbeddingRequest, model: str) -> dict[str, Any]:
        if req.dimensions is not None and req.dimensions != self.dimensions:
            raise APIError(400, f"dimensions must be {self.dimensions} for {self.name} (it cannot be shortened)",
                           "dimensions")
        try:
            items = prompt_items(req.input, "input")
        except ValueError as exc:
            raise APIError(400, str(exc), "input") from None
        rows = [self._tokenize(item) if isinstance(item, str) else list(item) for item in items]
        try:
            vectors = await self.client.embed(rows)
        except RequestRejected as exc:
            raise serving.rejected_error(exc, "input") from None
        except EngineDeadError as exc:
            raise APIError(503, f"the engine is not available: {exc}",
                           headers={"Retry-After": serving.RETRY_AFTER_S}) from None
        tokens = sum(len(r) for r in rows)
        return {
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": _encode(v, req.encoding_format)}
                     for i, v in enumerate(vectors)],
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
