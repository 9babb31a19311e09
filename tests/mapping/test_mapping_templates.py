"""Key templates, rules, prefixes, ignores and map_key, without checkpoints."""

from __future__ import annotations

import pytest

from tensorparity.errors import UsageError
from tensorparity.mapping import Concat, Mapping, MappingError, Rule, Split, Template


def test_placeholder_kinds() -> None:
    t = Template("model.layers.{i}.self_attn.{proj}.{rest*}")
    assert t.match("model.layers.12.self_attn.q_proj.lora.A.weight") == {
        "i": "12", "proj": "q_proj", "rest": "lora.A.weight"}
    assert t.match("model.layers.x.self_attn.q_proj.weight") is None  # {i} is digits only
    assert Template("a.{name}.b").match("a.x.y.b") is None  # {name} is one component
    assert Template("h{n:d}.w").match("h12.w") == {"n": "12"}
    assert Template("h{n:d}.w").match("hx.w") is None
    assert Template("{{lit}}.{p}").match("{lit}.weight") == {"p": "weight"}
    assert Template("a.{x}.{y*}").format({"x": "1", "y": "b.c"}) == "a.1.b.c"


@pytest.mark.parametrize(("text", "fix"), [
    ("layers.{i.weight", "close the placeholder"),
    ("layers.{i}}.w", "write '}}' for a literal brace"),
    ("layers.{i}.{i}", "use each placeholder once per template"),
    ("layers.{a}{b}", "put a literal (such as '.') between them"),
    ("layers.{i:x}", "{name:d} (digits)"),
    ("layers.{1a}", "name placeholders like Python variables"),
    ("", "write the key"),
])
def test_bad_templates_name_the_fix(text: str, fix: str) -> None:
    with pytest.raises(MappingError) as err:
        Rule(text, "x")
    assert fix in str(err.value)
    assert isinstance(err.value, UsageError)


def test_placeholders_must_agree_between_sides() -> None:
    with pytest.raises(MappingError, match=r"same placeholders, of the same kind"):
        Rule("layers.{i}.{p}", "blocks.{i}.{q}")
    with pytest.raises(MappingError, match=r"\{x:d\}"):
        Rule("layers.{x:d}", "blocks.{x}")


def test_rename_prefix_ignore_and_passthrough() -> None:
    m = Mapping([Rule("model.layers.{i}.{rest*}", "layers.{i}.{rest*}")], prefix_a="state_dict",
                ignore_a=["*.num_batches_tracked"])
    assert m.prefix_a == "state_dict."  # the trailing dot is optional
    assert m.map_key("state_dict.model.layers.3.attn.q.weight") == ["layers.3.attn.q.weight"]
    assert m.map_key("state_dict.head.weight") == ["head.weight"]  # passthrough (default)
    assert m.map_key("state_dict.bn.num_batches_tracked") == []
    assert m.map_key("optimizer_states.0") == []  # outside the prefix
    strict = Mapping(m.rules, prefix_a="state_dict", passthrough=False)
    assert strict.map_key("state_dict.head.weight") == []


def test_concat_and_split_rules_map_every_part() -> None:
    fuse = Rule(["l.{i}.q.{p}", "l.{i}.k.{p}", "l.{i}.v.{p}"], "l.{i}.qkv.{p}", Concat(0))
    m = Mapping([fuse])
    assert m.map_key("l.0.k.bias") == ["l.0.qkv.bias"]
    inv = m.inverted()
    assert inv.map_key("l.0.qkv.bias") == ["l.0.q.bias", "l.0.k.bias", "l.0.v.bias"]
    assert inv.rules[0].transform == Split(0, None, 3)  # equal parts, as many as b keys


def test_counts_need_a_transform_that_fits() -> None:
    with pytest.raises(MappingError, match=r"need a transform; fix: add transform: \{concat"):
        Rule(["a", "b"], "ab")
    with pytest.raises(MappingError, match=r"list the parts under a and the fused key under b"):
        Rule("ab", ["a", "b"], Concat(0))
    with pytest.raises(MappingError, match=r"give one size per b key"):
        Rule("ab", ["a", "b"], Split(0, (1, 2, 3)))


def test_regex_rules_map_one_way() -> None:
    rule = Rule(r"h\.(\d+)\.attn\.c_attn\.(weight|bias)", r"layers.\1.qkv.\2", regex=True)
    m = Mapping([rule], name="gpt2")
    assert m.map_key("h.7.attn.c_attn.bias") == ["layers.7.qkv.bias"]
    with pytest.raises(MappingError) as err:
        m.inverted()
    assert "rules[0]" in str(err.value) and "has no inverse" in str(err.value)
    assert "write it as a template rule" in err.value.problems[0].fix
    with pytest.raises(MappingError, match=r"refers to group 3"):
        Rule(r"h\.(\d+)\.(w)", r"l.\3", regex=True)
    with pytest.raises(MappingError, match=r"does not compile"):
        Rule(r"h\.(\d+", r"l.\1", regex=True)


def test_overlapping_rules_are_refused_unless_one_is_a_fallback() -> None:
    general = Rule("encoder.{rest*}", "enc.{rest*}")
    specific = Rule("encoder.layers.{i}.qkv.weight", "enc.layers.{i}.attn.weight")
    with pytest.raises(MappingError) as err:
        Mapping([general, specific])
    assert "rules[0] and rules[1] both claim keys such as 'encoder.layers.0.qkv.weight'" in str(err.value)
    assert "`fallback: true`" in str(err.value)
    m = Mapping([Rule("encoder.{rest*}", "enc.{rest*}", fallback=True), specific])
    assert m.map_key("encoder.layers.2.qkv.weight") == ["enc.layers.2.attn.weight"]
    assert m.map_key("encoder.norm.bias") == ["enc.norm.bias"]


def test_two_rules_producing_one_key_are_refused() -> None:
    with pytest.raises(MappingError, match=r"both produce keys such as 'w.x'"):
        Mapping([Rule("a.{p}", "w.{p}"), Rule("b.{p}", "w.{p}")])


def test_inverting_twice_gives_the_mapping_back() -> None:
    m = Mapping([Rule("a.{p}", "b.{p}")], ignore_a=["*.x"], ignore_b=["*.y"], prefix_a="model.", name="m")
    inv = m.inverted()
    assert (inv.ignore_a, inv.ignore_b, inv.prefix_a, inv.prefix_b, inv.name) == (("*.y",), ("*.x",), "", "model.",
                                                                                  "inverse of m")
    assert inv.inverted() == m
