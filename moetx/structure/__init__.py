"""Layer 3, model structure: where a model keeps its blocks, attention, routers and experts.

`discover(model)` is the only way passes learn a model's layout. Adapters for model families
register themselves here on import (`hf`: Hugging Face transformers, which it never imports).
`tensors` and `swap` are the small module-level tools the passes share.
"""

from moetx.structure import hf as hf  # registers the Hugging Face adapter on import
from moetx.structure.discovery import (
    WRAPPER_ATTRS,
    Block,
    ModelStructure,
    MoELayer,
    StructureAdapter,
    canonical_fqn,
    discover,
    register_structure_adapter,
)

__all__ = [
    "WRAPPER_ATTRS",
    "Block",
    "MoELayer",
    "ModelStructure",
    "StructureAdapter",
    "canonical_fqn",
    "discover",
    "register_structure_adapter",
]
