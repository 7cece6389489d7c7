"""Neural fields: per-prompt (generated) or shared multi-resolution grids, or per-prompt triplanes (LATTE3D),
with a density/colour MLP.

Fields are registered in ``att3d.registry.FIELDS``; every module of this package is imported when the registry
is first used, so a new field module needs no line here.
"""

from att3d.field.grid_field import GridField, trunc_exp
from att3d.field.triplane import TriplaneField

__all__ = ["GridField", "TriplaneField", "trunc_exp"]
