"""Loading mappings from YAML: the schema, round trips, and every problem reported at once."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tensorparity.mapping import (
    Cast,
    Concat,
    Mapping,
    MappingError,
    Rearrange,
    Reshape,
    Rule,
    Split,
    Transpose,
    load_mapping,
)

WriteYaml = Callable[..., Path]

SCHEMA_EXAMPLE = """\
version: 1
name: reference-to-port
prefix_a: ""
prefix_b: ""
rules:
  - {a: "pre_encode.{p}", b: "subsample.{p}"}
  - {a: "layers.{i}.norm1.{p}", b: "blocks.{i}.attn_norm.{p}"}
  - a: ["layers.{i}.self_attn.q_proj.{p}", "layers.{i}.self_attn.k_proj.{p}", "layers.{i}.self_attn.v_proj.{p}"]
    b: "blocks.{i}.qkv.{p}"
    transform: {concat: {dim: 0}}
  - {a: "wq.weight", b: "q.weight", transform: {rearrange: "(h two d) c -> (h d two) c", h: 4, two: 2}}
  - {a: "conv.weight", b: "conv.weight", transform: {transpose: [0, 1]}}
ignore_a: ["*.num_batches_tracked"]
ignore_b: []
"""


def test_the_documented_schema_loads(write_yaml: WriteYaml) -> None:
    path = write_yaml(SCHEMA_EXAMPLE)
    m = Mapping.from_yaml(path)
    assert m.name == "reference-to-port" and m.passthrough
    assert m.rules[2] == Rule(["layers.{i}.self_attn.q_proj.{p}", "layers.{i}.self_attn.k_proj.{p}",
                               "layers.{i}.self_attn.v_proj.{p}"], "blocks.{i}.qkv.{p}", Concat(0))
    assert m.rules[3].transform == Rearrange("(h two d) c -> (h d two) c", (("h", 4), ("two", 2)))
    assert m.rules[4].transform == Transpose(0, 1)
    assert [r.line for r in m.rules] == [6, 7, 8, 11, 12]
    assert m.ignore_a == ("*.num_batches_tracked",) and m.source == str(path)


def test_to_yaml_round_trips_every_kind_of_rule(write_yaml: WriteYaml) -> None:
    m = Mapping([
        Rule("model.{rest*}", "{rest*}", fallback=True, note="whatever else: strip the wrapper"),
        Rule(["l.{i}.q.{p}", "l.{i}.k.{p}"], "l.{i}.qk.{p}", Concat(0, (8, 2))),
        Rule("l.{i}.qkv.{p}", ["l.{i}.q2.{p}", "l.{i}.k2.{p}", "l.{i}.v2.{p}"], Split(0)),
        Rule("wq.weight", "q.weight", Rearrange("(h two d) c -> (h d two) c", (("h", 4), ("two", 2)))),
        Rule(r"h\.(\d+)\.mlp\.c_fc\.weight", r"layers.\1.fc1.weight", Transpose(0, 1), regex=True),
        Rule("emb{{0}}.{p}", "embed.{p}",
             {"chain": [{"reshape": [4, -1]}, {"cast": {"dtype": "bf16", "from": "fp32"}}]}),
    ], ignore_a=["*.num_batches_tracked"], ignore_b=["*.inv_freq"], prefix_a="state_dict.", name="everything",
        passthrough=False, description="every kind of rule")
    text = m.to_yaml()
    assert "# concat along dim 0 (sizes [8, 2])" in text  # humans see what each transform does
    again = Mapping.from_yaml(write_yaml(text))
    assert again == m
    assert again.description == "every kind of rule" and again.rules[0].note == "whatever else: strip the wrapper"
    assert again.rules[5].transform.steps[1] == Cast(torch.bfloat16, torch.float32)  # type: ignore[union-attr]


def test_the_bundled_example_round_trips(example_mapping: Mapping, example_yaml: Path) -> None:
    assert Mapping.from_dict(example_mapping.to_dict()) == example_mapping
    assert load_mapping(example_yaml) == example_mapping
    assert load_mapping(example_mapping) is example_mapping


BROKEN = """\
version: 1
name: broken
prefixa: "model."
passthrough: yes please
rules:
  - {a: "layers.{i}.q.{p}", b: "blocks.{i}.q.{p}", trasform: {transpose: [0, 1]}}
  - {a: "layers.{i.weight", b: "blocks.{i}.weight"}
  - {a: "h\\\\.(\\\\d+\\\\.attn", b: "layers.\\\\1.attn", regex: true}
  - a: "x.{p}"
    b: "y.{p}"
    transform: {rearange: "a b -> b a"}
  - {a: "enc.{rest*}", b: "e.{rest*}"}
  - {a: "enc.layers.{i}.{p}", b: "e.l.{i}.{p}"}
  - {a: ["a.{p}", "b.{p}"], b: "ab.{p}"}
  - {a: "w", b: "v", b: "u"}
ignore_a: "*.num_batches_tracked"
"""


def test_every_problem_is_reported_together_with_its_line(write_yaml: WriteYaml) -> None:
    path = write_yaml(BROKEN)
    with pytest.raises(MappingError) as err:
        Mapping.from_yaml(path)
    found = {(p.line, p.rule): (p.message, p.fix) for p in err.value.problems}
    expected = {
        (3, None): ("unknown field 'prefixa'", "did you mean 'prefix_a'?"),
        (4, None): ("passthrough must be true or false", "write passthrough: true"),
        (6, 0): ("unknown field 'trasform'", "did you mean 'transform'?"),
        (7, 1): ("unclosed '{' in template 'layers.{i.weight'", "close the placeholder"),
        (8, 2): ("does not compile", "fix the regular expression"),
        (11, 3): ("unknown transform 'rearange'", "did you mean 'rearrange'?"),
        (13, 5): ("rules[4] and rules[5] both claim keys such as 'enc.layers.0.x'", "`fallback: true`"),
        (14, 6): ("2 a key(s) and 1 b key(s) need a transform", "{concat: {dim: 0}}"),
        (15, None): ("field 'rules.7.b' is given twice", "keep one of them"),
    }
    for where, (message, fix) in expected.items():
        assert where in found, f"no problem reported at line/rule {where}: {sorted(found)}"
        assert message in found[where][0] and fix in found[where][1]
    assert len(err.value.problems) == len(expected)
    text = str(err.value)
    assert text.splitlines()[0] == f"{path}: 9 problems in the mapping, nothing was compared"
    assert f"{path}:11: rules[3] (x.{{p}} -> y.{{p}}): transform: unknown transform 'rearange'" in text


def test_yaml_syntax_errors_name_the_line(write_yaml: WriteYaml) -> None:
    with pytest.raises(MappingError) as err:
        Mapping.from_yaml(write_yaml("version: 1\nrules:\n  - {a: x, b: [y\n"))
    assert err.value.problems[0].line is not None and "not valid YAML" in str(err.value)
    assert "fix the YAML syntax" in str(err.value)


@pytest.mark.parametrize(("text", "fix"), [
    ("- a\n- b\n", "start with `version: 1`"),
    ("version: 2\n", "write version: 1"),
    ("rules: {a: x, b: y}\n", "write each rule as `- {a: ..., b: ...}`"),
    ("rules:\n  - just-a-string\n", "write `- {a: old.key, b: new.key}`"),
    ("rules:\n  - {a: x}\n", "give b: the key"),
    ("rules:\n  - {a: x, b: 3}\n", "quote the template"),
    ("ignore_a: [1, 2]\n", "write ignore_a: ['*.num_batches_tracked']"),
])
def test_schema_errors_name_the_fix(write_yaml: WriteYaml, text: str, fix: str) -> None:
    with pytest.raises(MappingError) as err:
        Mapping.from_yaml(write_yaml(text))
    assert fix in str(err.value)


def test_a_missing_file_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(MappingError, match=r"no such mapping file; fix: check the path"):
        Mapping.from_yaml(tmp_path / "nope.yaml")


def test_inverting_names_every_rule_without_an_inverse(write_yaml: WriteYaml) -> None:
    path = write_yaml("""\
rules:
  - {a: "a.weight", b: "a.flat", transform: {reshape: [-1]}}
  - {a: "b.weight", b: "b.t", transform: {transpose: [0, 1]}}
  - {a: "c\\\\.(\\\\w+)", b: "d.\\\\1", regex: true}
  - {a: "e.weight", b: "e.half", transform: {cast: float16}}
""")
    m = Mapping.from_yaml(path)
    with pytest.raises(MappingError) as err:
        m.inverted()
    assert [(p.rule, p.line) for p in err.value.problems] == [(0, 2), (2, 4), (3, 5)]
    assert "bind the mapping to a checkpoint of side A" in err.value.problems[0].fix
    assert "write it as a template rule" in err.value.problems[1].fix
    # Bound to a checkpoint of side A, reshape and cast learn what they need and invert.
    bound = m.with_rules([m.rules[0], m.rules[1], m.rules[3]]).bind(
        {"a.weight": torch.zeros(2, 3), "b.weight": torch.zeros(2, 3), "e.weight": torch.zeros(2)})
    inverse = bound.inverted()
    assert inverse.rules[0].transform == Reshape((2, 3), (6,))
    assert inverse.rules[2].transform == Cast(torch.float32, torch.float16)


def test_load_mapping_refuses_what_is_neither_a_mapping_a_dict_nor_a_path() -> None:
    # the one check behind diff(mapping=...), compare(mapping=...) and convert(mapping=...)
    from tensorparity.errors import UsageError
    from tensorparity.mapping import load_mapping

    with pytest.raises(UsageError, match="mapping must be a tensorparity.mapping.Mapping or the path of a YAML file, "
                                         "not int") as err:
        load_mapping(3)  # type: ignore[arg-type]
    assert err.value.fix == "pass mapping='map.yaml' or Mapping.from_yaml(...)"
