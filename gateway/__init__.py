"""Attribution gateway: receives attribution postbacks from measurement partners and stores each
as one common :class:`AttributionEvent`.

What a partner plugin needs is importable from here: ``hookimpl``, ``PartnerSpec``,
``AttributionEvent``, ``MappingError`` and the helpers in :mod:`gateway.normalise`.
"""

from gateway.errors import MappingError
from gateway.events import AttributionEvent
from gateway.hookspecs import PartnerSpec, hookimpl

__all__ = ["AttributionEvent", "MappingError", "PartnerSpec", "hookimpl"]
