"""Fixtures for the mapping tests: the bundled reference model and its port, and their mapping."""

from __future__ import annotations

from collections.abc import Callable
from importlib.resources import files
from pathlib import Path

import pytest
import torch

from tensorparity.examples import port_model, reference_model
from tensorparity.mapping import Mapping

EXAMPLE_YAML = Path(str(files("tensorparity.examples") / "reference_to_port.yaml"))


@pytest.fixture(scope="session")
def reference_state() -> dict[str, torch.Tensor]:
    return reference_model().state_dict()


@pytest.fixture(scope="session")
def port_state() -> dict[str, torch.Tensor]:
    return port_model().state_dict()


@pytest.fixture(scope="session")
def example_mapping() -> Mapping:
    return Mapping.from_yaml(EXAMPLE_YAML)


@pytest.fixture(scope="session")
def example_yaml() -> Path:
    return EXAMPLE_YAML


@pytest.fixture
def write_yaml(tmp_path: Path) -> Callable[[str], Path]:
    """Write a mapping file into the test's folder; returns its path."""

    def write(text: str, name: str = "map.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return write
