"""Neural fields: per-prompt (generated) or shared multi-resolution grids with a density/colour MLP.

Fields are registered in ``att3d.registry.FIELDS``; every module of this package is imported when the registry
is first used, so a new field module needs no line here.
"""

from att3d.field.grid_field import GridField, trunc_exp

__all__ = ["GridField", "trunc_exp"]
