"""nn.ModuleList: registration order, dotted names, indexing, state dicts, errors."""
import numpy as np
import pytest

from pymglu import nn


def test_names_order_and_indexing():
    layers = nn.ModuleList([nn.Linear(3, 4, rng=0), nn.RMSNorm(4)])
    layers.append(nn.Linear(4, 2, rng=1))
    assert len(layers) == 3
    assert [type(m).__name__ for m in layers] == ["Linear", "RMSNorm", "Linear"]
    assert layers[-1] is layers[2] and layers[0].d_out == 4
    assert [n for n, _ in layers.named_parameters()] == ["0.weight", "1.weight", "2.weight"]

    class Owner(nn.Module):
        def __init__(self, blocks):
            super().__init__()
            self.blocks = blocks

    owner = Owner(layers)
    assert list(owner.state_dict()) == ["blocks.0.weight", "blocks.1.weight", "blocks.2.weight"]
    copy = Owner(nn.ModuleList([nn.Linear(3, 4, rng=5), nn.RMSNorm(4), nn.Linear(4, 2, rng=6)]))
    assert not np.array_equal(copy.blocks[0].weight.data, layers[0].weight.data)
    copy.load_state_dict(owner.state_dict())
    np.testing.assert_array_equal(copy.blocks[0].weight.data, layers[0].weight.data)
    np.testing.assert_array_equal(copy.blocks[2].weight.data, layers[2].weight.data)


def test_errors():
    layers = nn.ModuleList()
    assert len(layers) == 0 and list(layers) == []
    with pytest.raises(TypeError, match="expected a pymglu.nn.Module"):
        layers.append("not a module")
    with pytest.raises(IndexError, match="out of range"):
        layers[0]
    layers.append(nn.RMSNorm(2))
    with pytest.raises(TypeError, match="expected an int"):
        layers["0"]
