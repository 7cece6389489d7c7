"""Neural fields: per-prompt (generated) or shared multi-resolution grids with a density/colour MLP."""

from att3d.field.grid_field import GridField, GridFieldConfig, num_parameters, trunc_exp

__all__ = ["GridField", "GridFieldConfig", "num_parameters", "trunc_exp"]
