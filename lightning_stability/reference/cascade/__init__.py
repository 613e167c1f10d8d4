"""The reference cascade: ``CascadeTransformerModule`` and its network (``CascadeTransformer``, ``CascadeConfig``).
Names are imported lazily on first use."""

from typing import TYPE_CHECKING

from lightning_stability._lazy import lazy_getattr

_NAMES = {
    "CascadeTransformerModule": ".module",
    "CascadeConfig": ".transformer",
    "CascadeTransformer": ".transformer",
    "small_init_": ".transformer",
}
__all__ = list(_NAMES)
__getattr__ = lazy_getattr(__name__, _NAMES)

if TYPE_CHECKING:  # the static view of the lazy names (type checkers, the API reference)
    from lightning_stability.reference.cascade.module import CascadeTransformerModule as CascadeTransformerModule
    from lightning_stability.reference.cascade.transformer import CascadeConfig as CascadeConfig
    from lightning_stability.reference.cascade.transformer import CascadeTransformer as CascadeTransformer
    from lightning_stability.reference.cascade.transformer import small_init_ as small_init_
