"""Acceptance (issue #11): layer parity you can trust on real ports.

Four pairs of implementations written by others, B's weights converted by the port's own converter
(see ``ports.py``): Hugging Face Llama vs torchtune (``hf_to_tune`` permutes q/k rows; torchtune
shares one RoPE module between layers), Hugging Face GPT-2 vs a plain ``nn.Linear`` port (Conv1D
transposed, fused ``c_attn`` split), ``nn.MultiheadAttention`` vs split q/k/v, and one activation
instance shared by every feed-forward vs one per feed-forward.

For every pair:

- the converted B computes what A computes (the port is right), and every planted bug changes it;
- each side is captured in its own process by the real CLI, full and stats mode, and
  ``compare_traces`` WITHOUT a mapping (the library finds it from the traces) says the runs are
  the same, with no mismatched layer: activations that the converter's weight transforms permute,
  fuse or split are compared through those transforms, layers whose activations differ only by
  such a transform that a later layer undoes ("healed") are not mismatches, a shared module's
  calls are named after their call sites, and the default float32 tolerance does not fail two
  correct float32 implementations on rounding;
- ``replay`` of the reference on the correct B finds no culprit;
- for every planted bug, compare's first divergence (forward, introduced) and replay's only
  culprit are the layer the bug was planted in;
- a mapping suggested from the two state dicts (``tensorparity map suggest``), either way round,
  works in compare and says the port is right.

Many of these assertions describe features being built for issue #11; they fail until then.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import ports  # noqa: E402

from tensorparity.trace import Trace, capture, compare_traces, replay  # noqa: E402
from tensorparity.trace._replay import ReplayReport  # noqa: E402
from tensorparity.trace._trace_report import TraceReport  # noqa: E402

PAIRS = list(ports.PAIRS)
BUGS = [pytest.param(pair, bug.name, id=f"{pair}-{bug.name}") for pair, bugs in ports.BUGS.items() for bug in bugs]
MODES = ("full", "stats")


def require(name: str) -> None:
    for module in ports.REQUIRES[name]:
        pytest.importorskip(module)


_PAIRS: dict[str, ports.Pair] = {}


def get_pair(name: str) -> ports.Pair:
    require(name)
    if name not in _PAIRS:
        _PAIRS[name] = ports.PAIRS[name]()
    return _PAIRS[name]


# --------------------------------------------------------------------------------------------
# Diagnostics: what a failing assertion prints (the report that drives the library work)
# --------------------------------------------------------------------------------------------


def explain(report: TraceReport, top: int = 12) -> str:
    lines = [f"verdict={report.verdict} exit_code={report.exit_code} alignment={report.alignment}",
             report.summary(), report.classic_summary()]
    first = report.first_divergence
    if first is not None:
        lines.append(f"first_divergence: {first.layer_a} -> {first.layer_b} ({first.direction}, {first.origin}, "
                     f"error {first.error:.3g}, input error {first.input_error:.3g}, "
                     f"inherited from {first.inherited_from})")
    for x in report.mismatched[:top]:
        worst = x.worst
        what = f"{worst.key} max_abs {worst.max_abs:.3g} max_rel {worst.max_rel:.3g} status {worst.status}" \
            if worst is not None else ""
        lines.append(f"  mismatched: {x.layer_a} -> {x.layer_b} fwd={x.forward_passed} bwd={x.backward_passed} "
                     f"rel_error={x.error:.3g} origin={x.origin} | {what}")
    if len(report.mismatched) > top:
        lines.append(f"  ... and {len(report.mismatched) - top} more mismatched layers")
    bad_params = [t for t in report.params if not t.passed]
    for t in bad_params[:top]:
        lines.append(f"  param grad: {t.key} -> {t.key_b or t.key} max_abs {t.max_abs:.3g} max_rel {t.max_rel:.3g}")
    lines.append(f"  only in A: {[x.layer for x in report.only_a][:top]} ({len(report.only_a)})")
    lines.append(f"  only in B: {[x.layer for x in report.only_b][:top]} ({len(report.only_b)})")
    lines += [f"  warning: {w}" for w in report.warnings] + [f"  note: {n}" for n in report.notes]
    return "\n".join(lines)


def explain_replay(report: ReplayReport, top: int = 12) -> str:
    lines = [report.summary(), "culprits: " + repr([(x.layer, x.module) for x in report.culprits])]
    lines += ["  " + x.describe() for x in report.mismatched[:top]]
    lines.append(f"  skipped: {[(s.layer, s.reason) for s in report.skipped][:top]}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Traces: A and B captured by the real CLI, each in its own process
# --------------------------------------------------------------------------------------------


def cli_capture(factory: str, input_factory: str, loss: str, mode: str, out: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH", "")]))
    return subprocess.run(
        [sys.executable, "-m", "tensorparity", "capture", factory, "--input", input_factory, "--loss", loss,
         "--mode", mode, "--inputs", "-o", str(out)],
        capture_output=True, text=True, timeout=300, env=env)


class CliTraces:
    """Each pair's A and B, full and stats, captured by ``tensorparity capture``, each in its own
    process; the four of a pair run at once, the first time a test asks for one of them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.done: dict[tuple[str, str, str], Path | subprocess.CompletedProcess[str]] = {}

    def _capture_pair(self, name: str) -> None:
        factory_a, factory_b, input_factory, loss = ports.CLI[name]
        jobs = [((name, side, mode), factory, mode) for side, factory in (("a", factory_a), ("b", factory_b))
                for mode in MODES]

        def run(job: tuple[tuple[str, str, str], str, str]) -> None:
            key, factory, mode = job
            out = self.root / "-".join(key)
            done = cli_capture(factory, input_factory, loss, mode, out)
            self.done[key] = out if done.returncode == 0 else done

        with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
            list(pool.map(run, jobs))

    def get(self, name: str, side: str, mode: str) -> Path:
        require(name)
        if (name, side, mode) not in self.done:
            self._capture_pair(name)
        got = self.done[(name, side, mode)]
        assert isinstance(got, Path), \
            f"tensorparity capture of {name} side {side} ({mode}) failed:\n{got.stdout[-2000:]}\n{got.stderr[-3000:]}"
        return got


@pytest.fixture(scope="module")
def cli_traces(tmp_path_factory: pytest.TempPathFactory) -> CliTraces:
    return CliTraces(tmp_path_factory.mktemp("real-ports"))


def traced(cli_traces: CliTraces, name: str, side: str, mode: str) -> Path:
    return cli_traces.get(name, side, mode)


def parameter_layers(trace: Trace) -> set[str]:
    """The layers (module calls) of a trace that ran and own parameters (an ``out_proj`` that
    ``nn.MultiheadAttention`` uses functionally owns parameters but never runs)."""
    ran = {r.module for r in trace.records if r.kind == "output"}
    return {r.module for r in trace.records if r.kind == "param_grad"} & ran


_BUGGY: dict[tuple[str, str], torch.nn.Module] = {}


def get_buggy(name: str, bug: str) -> torch.nn.Module:
    """B with ``bug`` planted, built once (replay leaves it as it was; captures zero its gradients)."""
    if (name, bug) not in _BUGGY:
        _BUGGY[(name, bug)] = get_pair(name).buggy(bug)
    return _BUGGY[(name, bug)]


def capture_in_process(pair: ports.Pair, model: torch.nn.Module, mode: str = "full") -> Trace:
    model.zero_grad(set_to_none=True)
    with capture(model, inputs=True, mode=mode) as trace:  # type: ignore[arg-type]
        pair.run(model)
    return trace


# --------------------------------------------------------------------------------------------
# (a) the ports are right, and every bug breaks them
# --------------------------------------------------------------------------------------------


def test_every_pair_and_bug_has_its_cli_factories() -> None:
    for name, factories in ports.CLI.items():
        assert all(callable(getattr(ports, f.split(":")[1])) for f in factories), name
        b = factories[1].split(":")[1]
        for bug in ports.BUGS[name]:
            assert callable(getattr(ports, f"{b}_bug_{bug.name}")), bug.name
    assert sum(len(bugs) for bugs in ports.BUGS.values()) >= 6


@pytest.mark.parametrize("name", PAIRS)
def test_the_converted_port_computes_what_the_original_computes(name: str) -> None:
    pair = get_pair(name)
    with torch.no_grad():
        a = ports.logits_of(pair.model_a(*pair.inputs))
        b = ports.logits_of(pair.model_b(*pair.inputs))
    assert a.shape == b.shape and a.dtype == b.dtype == torch.float32
    err = (a - b).abs().max().item()
    assert err <= 2e-6, f"{name}: the converted port's output differs by {err:.3g}"
    assert a.abs().max().item() > 0.5  # not a degenerate, all-but-zero output
    # Seeded builders and pure converters: every build holds the same weights (so do other processes).
    again = pair.make_b().state_dict()
    assert all(torch.equal(v, again[k]) for k, v in pair.model_b.state_dict().items())


@pytest.mark.parametrize(("name", "bug"), BUGS)
def test_each_planted_bug_changes_the_output(name: str, bug: str) -> None:
    pair = get_pair(name)
    with torch.no_grad():
        a = ports.logits_of(pair.model_a(*pair.inputs))
        b = ports.logits_of(get_buggy(name, bug)(*pair.inputs))
    rel = ((a - b).abs().max() / a.abs().max()).item()
    assert rel > 1e-3, f"{name}/{bug}: the bug changes the output by only {rel:.3g} (relative)"
    assert pair.bug(bug).module_b in dict(pair.model_b.named_modules())


def test_the_llama_converter_is_needed() -> None:
    """Without hf_to_tune's q/k permutation the logits differ: the pair really tests the RoPE layouts."""
    require("llama")
    pair = get_pair("llama")
    raw = ports._bare_tune_llama().eval()
    state = dict(pair.model_b.state_dict())
    hf = pair.model_a.state_dict()
    for i in range(ports.LLAMA["layers"]):
        state[f"layers.{i}.attn.q_proj.weight"] = hf[f"model.layers.{i}.self_attn.q_proj.weight"]
        state[f"layers.{i}.attn.k_proj.weight"] = hf[f"model.layers.{i}.self_attn.k_proj.weight"]
    raw.load_state_dict(state)
    with torch.no_grad():
        a = ports.logits_of(pair.model_a(*pair.inputs))
        b = raw(*pair.inputs)
    assert ((a - b).abs().max() / a.abs().max()).item() > 1e-2


# --------------------------------------------------------------------------------------------
# (b) two processes, no mapping: the correct ports are the same
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", PAIRS)
def test_two_processes_without_a_mapping_say_the_port_is_right(cli_traces: CliTraces, name: str, mode: str) -> None:
    a = traced(cli_traces, name, "a", mode)
    b = traced(cli_traces, name, "b", mode)
    report = compare_traces(a, b)
    assert report.verdict != "differs" and report.exit_code == 0, explain(report)
    assert report.verdict in ("identical", "close"), explain(report)
    assert not report.mismatched and report.first_divergence is None, explain(report)
    assert report.forward_rate[0] == report.forward_rate[1] > 0, explain(report)
    # The mapping was found: every layer of A that ran and owns parameters has its partner in B
    # (a fused/split one through its transform), none is left over as "only in A".
    unpaired = parameter_layers(Trace.open(a)) - {x.layer_a for x in report.layers}
    assert not unpaired, f"layers of A with parameters but no partner: {sorted(unpaired)}\n" + explain(report)


@pytest.mark.parametrize("name", PAIRS)
def test_replay_of_the_reference_on_the_correct_port_finds_no_culprit(cli_traces: CliTraces, name: str) -> None:
    pair = get_pair(name)
    reference = traced(cli_traces, name, "a", "full")
    report = replay(reference, pair.make_b())
    assert report.exit_code == 0 and not report.culprits and not report.mismatched, explain_replay(report)
    # Every layer of A with parameters was replayed on its partner, none skipped.
    missing = parameter_layers(Trace.open(reference)) - {x.layer for x in report.layers}
    assert not missing, f"not replayed: {sorted(missing)}\n" + explain_replay(report)


# --------------------------------------------------------------------------------------------
# (c) every planted bug is blamed on the layer it was planted in
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("name", "bug"), BUGS)
def test_compare_names_the_planted_bug_as_the_first_divergence(cli_traces: CliTraces, name: str, bug: str,
                                                               mode: str) -> None:
    pair = get_pair(name)
    expected = pair.bug(bug)
    trace_b = capture_in_process(pair, get_buggy(name, bug), mode)
    report = compare_traces(traced(cli_traces, name, "a", mode), trace_b)
    assert report.exit_code == 1 and report.verdict == "differs", explain(report)
    first = report.first_divergence
    assert first is not None, explain(report)
    assert first.layer_a == expected.layer_a, explain(report)
    assert first.direction == "forward" and first.origin == "introduced", explain(report)
    # Nothing that finished before it (outside it) differs.
    inside = first.layer_a + "."
    assert all(x.forward_passed is not False for x in report.layers
               if x.order < first.order and not x.layer_a.startswith(inside)), explain(report)


@pytest.mark.parametrize(("name", "bug"), BUGS)
def test_replay_names_the_planted_bug_alone(cli_traces: CliTraces, name: str, bug: str) -> None:
    pair = get_pair(name)
    expected = pair.bug(bug)
    report = replay(traced(cli_traces, name, "a", "full"), get_buggy(name, bug))
    assert report.exit_code == 1, explain_replay(report)
    assert [(x.layer, x.module) for x in report.culprits] == [(expected.layer_a, expected.module_b)], \
        explain_replay(report)


# --------------------------------------------------------------------------------------------
# A suggested mapping (fused / split / permuted parameters) works in compare
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def suggested(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {"root": tmp_path_factory.mktemp("suggested")}


def suggested_mapping(name: str, folder: Path, direction: str) -> Path:
    """``tensorparity map suggest`` from one side's state dict to the other's, saved as YAML."""
    from tensorparity.mapping import suggest_mapping

    pair = get_pair(name)
    path = folder / f"{name}-{direction}.yaml"
    if not path.exists():
        a, b = pair.model_a.state_dict(), pair.model_b.state_dict()
        suggestion = suggest_mapping(a, b) if direction == "a-to-b" else suggest_mapping(b, a)
        path.write_text(suggestion.to_yaml())
    return path


def sides(cli_traces: CliTraces, name: str, direction: str) -> tuple[Path, Path]:
    a, b = traced(cli_traces, name, "a", "full"), traced(cli_traces, name, "b", "full")
    return (a, b) if direction == "a-to-b" else (b, a)


DIRECTIONS = ("a-to-b", "b-to-a")  # b-to-a: the fused/split keys are on the mapping's A side


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("name", PAIRS)
def test_a_suggested_mapping_does_not_crash_compare(cli_traces: CliTraces, suggested: dict[str, Path], name: str,
                                                    direction: str) -> None:
    """Reported on issue #11: ``_Invalid: placeholder {i} appears twice in 'layers.{i}.attn.q_proj + ...'``
    for a suggested fused/split rule."""
    mapping = suggested_mapping(name, suggested["root"], direction)
    compare_traces(*sides(cli_traces, name, direction), mapping=mapping)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("name", PAIRS)
def test_a_suggested_mapping_says_the_port_is_right(cli_traces: CliTraces, suggested: dict[str, Path], name: str,
                                                    direction: str) -> None:
    mapping = suggested_mapping(name, suggested["root"], direction)
    report = compare_traces(*sides(cli_traces, name, direction), mapping=mapping)
    assert report.exit_code == 0 and not report.mismatched, explain(report)
