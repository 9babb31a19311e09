import torch

from tensorparity.examples import from_reference, port_model, reference_model


def test_port_computes_the_reference_function() -> None:
    x = torch.randn(2, 16, 20)
    torch.testing.assert_close(port_model()(x), reference_model()(x), atol=1e-5, rtol=1e-5)


def test_converter_covers_every_port_weight() -> None:
    converted = from_reference(reference_model().state_dict())
    expected = port_model().state_dict()
    assert set(converted) == set(expected)
    assert all(converted[k].shape == expected[k].shape for k in expected)
