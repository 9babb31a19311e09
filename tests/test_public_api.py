import tensorparity


def test_all_is_sorted_and_importable() -> None:
    assert tensorparity.__all__ == sorted(tensorparity.__all__)
    for name in tensorparity.__all__:
        assert hasattr(tensorparity, name), name


def test_errors_render_one_line_with_fix() -> None:
    err = tensorparity.TensorParityError("bad\nheader", path="a.pt", key="w", fix="save it again")
    assert str(err) == "a.pt [w]: bad header; fix: save it again"
    assert not issubclass(tensorparity.InternalError, tensorparity.TensorParityError)


def test_capture_and_the_callable_compare_package() -> None:
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Tanh())
    with tensorparity.capture(model) as trace:
        model(torch.ones(2, 3)).sum().backward()
    report = tensorparity.compare(trace, model)  # a live model, run on the trace's recorded input
    assert report.verdict == "identical" and report.exit_code == 0
    assert tensorparity.Tolerance is tensorparity.numerics.tolerance.Tolerance  # still the package


def test_importing_tensorparity_does_not_import_torch_distributed_tensor() -> None:
    # DTensor support must not cost every command ~0.4 s and ~40 MB of start-up (#12: nothing slower)
    import subprocess
    import sys

    code = "import sys, tensorparity, tensorparity.cli; print('torch.distributed.tensor' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_subpackages_are_attributes_of_the_lazy_root() -> None:
    # `import tensorparity` loads nothing heavy, yet `tensorparity.trace.Trace` works as it did
    # when the root imported everything; an unknown name is still an AttributeError
    import subprocess
    import sys

    code = ("import tensorparity, sys; assert 'torch' not in sys.modules; "
            "print(tensorparity.trace.Trace.__name__, tensorparity.mapping.Mapping.__name__, "
            "tensorparity.diff.__module__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["Trace", "Mapping", "tensorparity.checks._diff"], done.stderr
    try:
        tensorparity.no_such_name  # noqa: B018
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:
        raise AssertionError("an unknown name must raise AttributeError")
