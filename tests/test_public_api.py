import tensorparity


def test_all_is_sorted_and_importable() -> None:
    assert tensorparity.__all__ == sorted(tensorparity.__all__)
    for name in tensorparity.__all__:
        assert hasattr(tensorparity, name), name


def test_errors_render_one_line_with_fix() -> None:
    err = tensorparity.TensorParityError("bad\nheader", path="a.pt", key="w", fix="save it again")
    assert str(err) == "a.pt [w]: bad header; fix: save it again"
    assert not issubclass(tensorparity.InternalError, tensorparity.TensorParityError)
