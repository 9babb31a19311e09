"""A checkpoint that carries its own model stands where a factory is expected: a Hugging Face model
folder (config.json + weights) through transformers, a ``.nemo`` file through NeMo's restore_from.
Nothing is downloaded: the folders are written here by ``save_pretrained`` from tiny configs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from _cli_helpers import assert_one_line_error
from typer.testing import CliRunner

from tensorparity import load_check
from tensorparity._factory import build_model, carries_model
from tensorparity._resolve import FactoryError, PackageNotInstalledError
from tensorparity.checkpoint.tracefolder.reader import Trace
from tensorparity.cli import app
from tensorparity.trace import capture_run
from tensorparity.trace.seed import InputSpec

transformers = pytest.importorskip("transformers")
runner = CliRunner(env={"COLUMNS": "160"})
HAS_NEMO = importlib.util.find_spec("nemo") is not None
TOKENS = "input_ids=2x8:int64:high=100"


def _gpt2(folder: Path) -> torch.nn.Module:
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64, bos_token_id=0,
                                     eos_token_id=0, use_cache=False, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    folder = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    return folder, _gpt2(folder)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hf") / "tiny-llama"
    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                      num_attention_heads=2, num_key_value_heads=2, vocab_size=100,
                                      max_position_embeddings=64, use_cache=False, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_a_hugging_face_folder_builds_the_class_its_config_names(gpt2: tuple[Path, torch.nn.Module],
                                                                  llama: Path) -> None:
    folder, saved = gpt2
    built = build_model(str(folder))
    assert built.model_class == "transformers.models.gpt2.modeling_gpt2.GPT2LMHeadModel"
    assert built.factory == str(folder) and carries_model(str(folder))
    theirs = saved.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in built.model.state_dict().items())
    assert type(build_model(str(llama)).model).__name__ == "LlamaForCausalLM"


def test_an_architecture_transformers_lacks_falls_back_to_automodel(gpt2: tuple[Path, torch.nn.Module],
                                                                     tmp_path: Path) -> None:
    folder = tmp_path / "custom"
    _gpt2(folder)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["MyOwnGPT2ForTests"]
    (folder / "config.json").write_text(json.dumps(config))
    assert type(build_model(str(folder)).model).__name__ == "GPT2Model"


def test_a_folder_without_config_or_weights_is_one_line(tmp_path: Path, gpt2: tuple[Path, torch.nn.Module]) -> None:
    with pytest.raises(FactoryError) as info:
        build_model(str(tmp_path))
    assert "is a folder without config.json" in str(info.value) and "save_pretrained" in info.value.fix
    assert not carries_model(str(tmp_path))
    empty = tmp_path / "config-only"
    empty.mkdir()
    (empty / "config.json").write_text((gpt2[0] / "config.json").read_text())
    with pytest.raises(FactoryError) as info:
        build_model(str(empty), role="reference")
    text = str(info.value)
    assert text.startswith(f"loading the Hugging Face folder of the reference {str(empty)!r} raised OSError")
    assert "\n" not in text and "model.safetensors" in info.value.fix


def test_a_trace_folder_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "manifest.json").write_text("{}")
    assert not carries_model(str(tmp_path))


def test_capture_replay_compare_and_load_check_through_the_cli(gpt2: tuple[Path, torch.nn.Module],
                                                               tmp_path: Path) -> None:
    folder, saved = gpt2
    out = tmp_path / "trace"
    result = runner.invoke(app, ["capture", str(folder), "-o", str(out), "--inputs", "--input-spec", TOKENS])
    assert result.exit_code == 0, result.output
    assert "(GPT2LMHeadModel, mode full, forward + backward)" in result.stdout.splitlines()[0]
    trace = Trace.open(out)
    assert trace.provenance["factory"] == str(folder)
    assert trace.provenance["input_spec"] == ["input_ids=2x8:int64:high=100:seed=0"]
    args, kwargs = trace.inputs()
    ids = InputSpec.parse(TOKENS).build()
    assert args == () and torch.equal(kwargs["input_ids"], ids)
    with torch.no_grad():
        expected = saved(input_ids=ids).logits
    assert torch.equal(trace.load("<model>/0/model_output/logits"), expected)

    replayed = runner.invoke(app, ["replay", str(out), str(folder)])
    assert replayed.exit_code == 0, replayed.output
    assert "identical; 31 layers replayed, 0 differ, 0 skipped" in " ".join(replayed.stdout.split())
    compared = runner.invoke(app, ["compare", str(out), str(folder)])
    assert compared.exit_code == 0, compared.output
    assert "\nidentical: 31 layers match forward and backward" in compared.stdout
    checked = runner.invoke(app, ["load-check", str(folder / "model.safetensors"), str(folder),
                                  "--reference", str(folder)])
    assert checked.exit_code == 0, checked.output
    assert checked.stdout.startswith("passed: the checkpoint loads strictly into model (GPT2LMHeadModel)")


def test_capture_and_load_check_through_the_api(llama: Path, tmp_path: Path) -> None:
    trace = capture_run(str(llama), tmp_path / "t", input_spec=[TOKENS], backward=False)
    assert trace.provenance["model_class"].endswith("LlamaForCausalLM")
    assert trace.provenance["input_spec"] == ["input_ids=2x8:int64:high=100:seed=0"]
    report = load_check(llama / "model.safetensors", model=str(llama))
    assert report.verdict == "passed" and report.side("model").strict


def test_a_nemo_file_without_nemo_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nemo" else real(name, *a))
    nemo_file = tmp_path / "asr.nemo"
    nemo_file.write_bytes(b"not read: NeMo is absent")
    assert carries_model(str(nemo_file))
    with pytest.raises(PackageNotInstalledError) as info:
        build_model(str(nemo_file))
    assert info.value.package == "nemo" and "is not installed" in str(info.value)
    assert info.value.fix == "install NeMo to restore a .nemo file: pip install 'tensorparity[nemo]' 'nemo_toolkit[asr]'"
    result = runner.invoke(app, ["capture", str(nemo_file), "-o", str(tmp_path / "t"),
                                 "--input-spec", "input_signal=2x1600:float32:lengths"])
    assert_one_line_error(result, f"factory {str(nemo_file)!r}: package 'nemo' is not installed",
                          "fix: install NeMo to restore a .nemo file: pip install 'tensorparity[nemo]'")
    assert not (tmp_path / "t").exists()


def test_a_missing_nemo_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FactoryError, match="no such .nemo file; fix: check the path"):
        build_model(str(tmp_path / "absent.nemo"))


@pytest.mark.skipif(not HAS_NEMO, reason="nemo_toolkit is not installed (pip install 'tensorparity[nemo]' "
                                         "'nemo_toolkit[asr]')")
def test_a_nemo_file_is_restored_by_nemo_on_the_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nemo.core import ModelPT

    calls = []

    def restore_from(path: str, map_location: str | None = None) -> torch.nn.Module:
        calls.append((path, map_location))
        return torch.nn.Linear(2, 3)

    monkeypatch.setattr(ModelPT, "restore_from", restore_from)
    nemo_file = tmp_path / "asr.nemo"
    nemo_file.write_bytes(b"")
    built = build_model(str(nemo_file))
    assert calls == [(str(nemo_file), "cpu")] and built.model_class == "torch.nn.modules.linear.Linear"


def test_tied_weights_saved_once_load_through_their_partner(tmp_path: Path) -> None:
    # GPT-2's default ties lm_head.weight to transformer.wte.weight; save_pretrained stores the
    # tensor once. That checkpoint is right: load-check must pass it and say why, not report
    # lm_head.weight missing. A checkpoint that really lacks an untied key still fails.
    folder = tmp_path / "tied-gpt2"
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=64, bos_token_id=0,
                                     eos_token_id=0)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    weights = folder / "model.safetensors"
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        assert "lm_head.weight" not in f.keys()  # stored once, under the embedding
    report = load_check(weights, model=str(folder))
    assert report.passed, report.summary()
    assert any("lm_head.weight is tied to transformer.wte.weight" in n for n in report.notes), report.notes
    from safetensors.torch import load_file, save_file

    state = load_file(str(weights))
    del state["transformer.h.0.ln_1.weight"]
    save_file(state, str(tmp_path / "broken.safetensors"))
    broken = load_check(tmp_path / "broken.safetensors", model=str(folder))
    assert not broken.passed
    assert [i.key for i in broken.side("model").issues if i.kind == "missing"] == ["transformer.h.0.ln_1.weight"]
