"""Mappings between two key spaces: renames with templates or regexes, ignored keys, prefixes, and
tensor transforms (einops rearrange, transpose/permute, reshape, concat/split, dtype cast).

A :class:`Mapping` loads from YAML (:meth:`Mapping.from_yaml`) or is built in Python, reports
every problem at once (:class:`MappingError`), inverts where its transforms do, and applies to a
checkpoint lazily (:func:`apply_mapping`); :func:`tensorparity.convert` with ``mapping=`` writes the
converted checkpoint.

Example:
    >>> import torch
    >>> from tensorparity.mapping import Mapping, Rule, apply_mapping
    >>> m = Mapping([Rule("model.layers.{i}.{rest*}", "layers.{i}.{rest*}")])
    >>> list(apply_mapping({"model.layers.0.attn.w": torch.ones(1)}, m).checkpoint)
    ['layers.0.attn.w']
"""

from tensorparity.mapping._digests import suggest_from_signatures  # noqa: E402
from tensorparity.mapping._param_signature import ParamSignature, param_signature  # noqa: E402
from tensorparity.mapping.apply import Direction, MappedResult, apply_mapping
from tensorparity.mapping.loader import load_mapping, register_transform, transform_from_dict, transform_names
from tensorparity.mapping.multi import Chain, Concat, Split
from tensorparity.mapping.rules import Mapping, MappingError, MappingProblem, Rule
from tensorparity.mapping.suggest import SuggestedPair, Suggestion, suggest_mapping  # noqa: E402
from tensorparity.mapping.templates import Template
from tensorparity.mapping.transforms import (
    Cast,
    NotInvertibleError,
    Permute,
    Rearrange,
    Reshape,
    Transform,
    TransformSpecError,
    Transpose,
)

__all__ = [
    "Cast",
    "Chain",
    "Concat",
    "Direction",
    "MappedResult",
    "Mapping",
    "MappingError",
    "MappingProblem",
    "NotInvertibleError",
    "ParamSignature",
    "Permute",
    "Rearrange",
    "Reshape",
    "Rule",
    "Split",
    "SuggestedPair",
    "Suggestion",
    "Template",
    "Transform",
    "TransformSpecError",
    "Transpose",
    "apply_mapping",
    "load_mapping",
    "param_signature",
    "register_transform",
    "suggest_from_signatures",
    "suggest_mapping",
    "transform_from_dict",
    "transform_names",
]
