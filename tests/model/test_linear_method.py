"""A LinearMethod per layer and a weight loader per parameter: each checks its own shapes."""

from __future__ import annotations

import pytest
import torch

from pagoda.model.layers.linear import Linear, UnquantizedLinearMethod


def test_a_fused_layer_loads_each_shard_into_its_rows() -> None:
    layer = Linear(4, [3, 2, 2], bias=True, dtype=torch.float32)
    assert layer.weight.shape == (7, 4) and layer.weight.num_shards == 3
    pieces = [torch.full((3, 4), 1.0), torch.full((2, 4), 2.0), torch.full((2, 4), 3.0)]
    for shard, piece in enumerate(pieces):
        layer.weight.weight_loader(layer.weight, piece, shard, f"w{shard}")
        layer.bias.weight_loader(layer.bias, piece[:, 0], shard, f"b{shard}")
    assert torch.equal(layer.weight.data, torch.cat(pieces))
    x = torch.randn(5, 4)
    assert torch.allclose(layer(x), x @ torch.cat(pieces).T + torch.cat(pieces)[:, 0])


def test_a_shard_of_the_wrong_shape_is_refused_by_name() -> None:
    layer = Linear(4, [3, 2], bias=False, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.up_proj.weight' has shape \(3, 4\), expected \(2, 4\)"):
        layer.weight.weight_loader(layer.weight, torch.zeros(3, 4), 1, "model.layers.0.mlp.up_proj.weight")


def test_the_layer_multiplies_through_its_method() -> None:
    class Scaled(UnquantizedLinearMethod):
        """A method with its own parameters and product (as a quantized one has)."""

        def create_weights(self, layer, in_features, output_sizes, bias, dtype):  # type: ignore[no-untyped-def]
            super().create_weights(layer, in_features, output_sizes, bias, dtype)
            layer.scale = torch.nn.Parameter(torch.full((sum(output_sizes),), 2.0), requires_grad=False)

        def apply(self, layer, x):  # type: ignore[no-untyped-def]
            return super().apply(layer, x) * layer.scale

    layer = Linear(3, 2, bias=False, dtype=torch.float32, method=Scaled())
    layer.weight.data.copy_(torch.eye(2, 3))
    assert "scale" in dict(layer.named_parameters())
    assert torch.equal(layer(torch.tensor([[1.0, 2.0, 3.0]])), torch.tensor([[2.0, 4.0]]))
