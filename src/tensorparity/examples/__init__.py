"""A tiny reference model and a "port" of it, used by the demo, the tests and the docs.

The reference (:mod:`.reference`) is written the way a framework would write it (separate q/k/v
projections, ``nn.MultiheadAttention``-free attention, Conv1d front end); the port (:mod:`.port`)
computes the same function with the names and layouts a re-implementation typically picks (fused
qkv, other module names). :func:`.port.from_reference` converts weights from one to the other.
"""

from tensorparity.examples.port import PortModel, from_reference, port_model
from tensorparity.examples.reference import ReferenceModel, reference_model

__all__ = ["PortModel", "ReferenceModel", "from_reference", "port_model", "reference_model"]
