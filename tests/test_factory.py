"""Model factories: ``module:function``, ``module:Class``, ``path/to/file.py:function``, modules and
callables; every failure one FactoryError line naming the factory and the fix."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from tensorparity._factory import build_model
from tensorparity._resolve import FactoryError, PackageNotInstalledError, parse_factory
from tensorparity.errors import UsageError
from tensorparity.examples import ReferenceModel


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_module_function_builds_the_model() -> None:
    built = build_model("tensorparity.examples:reference_model")
    assert isinstance(built.model, ReferenceModel)
    assert built.factory == "tensorparity.examples:reference_model"
    assert built.model_class == "tensorparity.examples.reference.ReferenceModel"


def test_module_class_is_called_with_no_arguments() -> None:
    built = build_model("tensorparity.examples.port:PortModel")
    assert type(built.model).__name__ == "PortModel"
    assert len(built.model.blocks) == 2  # the class's defaults


def test_dotted_attribute_after_the_colon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "lc_registry_pkg" / "__init__.py",
          "import torch\nclass Registry:\n    @staticmethod\n    def build():\n        return torch.nn.Linear(2, 5)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert build_model("lc_registry_pkg:Registry.build").model.out_features == 5


def test_module_and_callable_objects_are_accepted() -> None:
    linear = nn.Linear(2, 3)
    assert build_model(linear).model is linear
    built = build_model(lambda: nn.Linear(2, 4))
    assert built.model.out_features == 4 and built.model_class == "torch.nn.modules.linear.Linear"


def test_file_factory_imports_its_siblings_and_restores_sys_path(tmp_path: Path) -> None:
    write(tmp_path / "lc_sibling_helper.py", "WIDTH = 7\n")
    factory = write(tmp_path / "make.py",
                    "import torch\nfrom lc_sibling_helper import WIDTH\n"
                    "def make():\n    return torch.nn.Linear(2, WIDTH)\n")
    before = list(sys.path)
    built = build_model(f"{factory}:make")
    assert built.model.out_features == 7
    assert sys.path == before


def test_module_factory_is_found_in_the_current_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The console script does not put the current folder on sys.path; factories see it anyway."""
    write(tmp_path / "lc_cwd_pkg" / "__init__.py", "")
    write(tmp_path / "lc_cwd_pkg" / "models.py", "import torch\ndef make():\n    return torch.nn.Linear(1, 9)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    before = list(sys.path)
    assert build_model("lc_cwd_pkg.models:make").model.out_features == 9
    assert sys.path == before


def test_a_file_shared_by_two_factories_is_imported_once(tmp_path: Path) -> None:
    factory = write(tmp_path / "models.py",
                    "import torch\nIMPORTS = []\nIMPORTS.append(1)\n"
                    "def a():\n    return torch.nn.Linear(1, len(IMPORTS))\n"
                    "def b():\n    return torch.nn.Linear(1, len(IMPORTS) + 10)\n")
    assert build_model(f"{factory}:a").model.out_features == 1
    assert build_model(f"{factory}:b").model.out_features == 11


def test_a_module_level_instance_is_used_as_it_is(tmp_path: Path) -> None:
    factory = write(tmp_path / "instance.py", "import torch\nMODEL = torch.nn.Linear(3, 3)\n")
    built = build_model(f"{factory}:MODEL")
    assert isinstance(built.model, nn.Linear) and built.model.in_features == 3


@pytest.mark.parametrize(("spec", "why"), [
    ("tensorparity.examples", "has no ':'"),
    (":make", "names no module"),
    ("tensorparity.examples:", "is not a (dotted) Python name"),
    ("tensorparity.examples:make()", "is not a (dotted) Python name"),
    ("1st.module:make", "neither a dotted module name nor a .py file"),
])
def test_malformed_strings_say_what_form_to_use(spec: str, why: str) -> None:
    with pytest.raises(FactoryError) as info:
        build_model(spec)
    assert why in str(info.value)
    assert info.value.fix is not None and "package.module:function" in info.value.fix
    assert "\n" not in str(info.value)


def test_parse_splits_at_the_last_colon() -> None:
    spec = parse_factory(r"C:\models\port.py:make")
    assert spec.path is not None and spec.module is None and spec.attribute == "make"
    assert parse_factory("a.b:c.d").module == "a.b"


def test_missing_top_level_package_is_not_installed() -> None:
    with pytest.raises(PackageNotInstalledError) as info:
        build_model("tp_no_such_package_xyz.models:make", role="reference")
    assert info.value.package == "tp_no_such_package_xyz"
    assert "is not installed" in str(info.value) and "install tp_no_such_package_xyz" in info.value.fix


def test_missing_submodule_of_an_installed_package_is_a_typo() -> None:
    with pytest.raises(FactoryError) as info:
        build_model("tensorparity.no_such_module:make")
    assert not isinstance(info.value, PackageNotInstalledError)
    assert "has no module 'tensorparity.no_such_module'" in str(info.value)
    assert info.value.fix == "check the spelling of the module path"


def test_missing_dependency_of_an_installed_package_is_an_error(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "lc_needs_dep_pkg" / "__init__.py", "")
    write(tmp_path / "lc_needs_dep_pkg" / "models.py", "import tp_missing_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(FactoryError) as info:
        build_model("lc_needs_dep_pkg.models:make")
    assert not isinstance(info.value, PackageNotInstalledError)
    assert "needs 'tp_missing_dependency_xyz'" in str(info.value)
    assert "install tp_missing_dependency_xyz" in info.value.fix


def test_missing_attribute_lists_what_the_module_offers() -> None:
    with pytest.raises(FactoryError) as info:
        build_model("tensorparity.examples:no_such_factory")
    assert "has no attribute 'no_such_factory'" in str(info.value)
    assert "reference_model" in info.value.fix and "port_model" in info.value.fix


def test_factory_with_required_arguments_is_refused_before_calling() -> None:
    with pytest.raises(FactoryError) as info:
        build_model("tensorparity.examples:from_reference")
    assert "needs the argument(s) state" in str(info.value)
    assert "def make(): return MyModel" in info.value.fix


def test_non_module_result_names_the_type(tmp_path: Path) -> None:
    factory = write(tmp_path / "sd.py", "import torch\ndef make():\n    return {'w': torch.ones(1)}\n")
    with pytest.raises(FactoryError) as info:
        build_model(f"{factory}:make")
    assert "returned an object of type dict, not a torch.nn.Module" in str(info.value)
    assert "return the model itself" in info.value.fix


def test_non_callable_attribute(tmp_path: Path) -> None:
    factory = write(tmp_path / "const.py", "SIZE = 3\n")
    with pytest.raises(FactoryError) as info:
        build_model(f"{factory}:SIZE")
    assert "names a value of type int, not a function or class" in str(info.value)


@pytest.mark.parametrize("body", ["raise RuntimeError('CUDA out of memory\\nline two')", "import sys; sys.exit(3)"])
def test_errors_in_the_users_code_become_one_line(tmp_path: Path, body: str) -> None:
    factory = write(tmp_path / "boom.py", f"def make():\n    {body}\n")
    with pytest.raises(FactoryError) as info:
        build_model(f"{factory}:make", role="reference")
    text = str(info.value)
    assert "\n" not in text and "reference factory" in text
    assert "RuntimeError: CUDA out of memory line two" in text or "SystemExit: 3" in text
    assert "fix the error in the factory's code" in info.value.fix


def test_syntax_error_at_import(tmp_path: Path) -> None:
    factory = write(tmp_path / "broken.py", "def make(:\n")
    with pytest.raises(FactoryError) as info:
        build_model(f"{factory}:make")
    assert "SyntaxError" in str(info.value)
    assert "_tensorparity_factory_broken" not in " ".join(sys.modules)  # a failed import leaves nothing behind


def test_missing_file_and_wrong_types(tmp_path: Path) -> None:
    with pytest.raises(FactoryError) as info:
        build_model(f"{tmp_path / 'absent.py'}:make")
    assert "no such Python file" in str(info.value) and info.value.fix.startswith("check the path")
    with pytest.raises(UsageError) as info2:
        build_model(42)
    assert "must be an nn.Module, a callable or a string, not int" in str(info2.value)


def test_a_callable_returning_a_tensor_is_refused() -> None:
    with pytest.raises(FactoryError) as info:
        build_model(lambda: torch.ones(1))
    assert "returned an object of type Tensor" in str(info.value)
