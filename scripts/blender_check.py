"""Imports GLB files in Blender (headless) and prints what a 3D artist would get: one JSON line per file.

    blender -b --python scripts/blender_check.py -- out/a-red-cube.glb [more.glb ...]

Blender installs from Debian's packages (``apt-get install blender python3-numpy``). Per mesh object: vertices,
faces, dimensions (Blender's Z-up metres: glTF's +Y becomes +Z), the material's Principled BSDF metallic and
roughness, where its base colour comes from (an image texture, with its size) and whether custom (the file's)
vertex normals were imported.
"""
import json
import sys

import bpy  # Blender's own module: this script runs inside Blender
import numpy

if not hasattr(numpy, "bool"):  # Debian 12's Blender 3.4 glTF importer uses numpy.bool, gone in numpy 1.24
    numpy.bool = bool


def check(path: str) -> None:
    """Import one GLB into an empty scene and print its mesh objects' properties."""
    bpy.ops.wm.read_factory_settings(use_empty=True)
    bpy.ops.import_scene.gltf(filepath=path)
    out = []
    for ob in bpy.context.scene.objects:
        if ob.type != "MESH":
            continue
        me = ob.data
        mat = me.materials[0] if me.materials else None
        info = {"object": ob.name, "vertices": len(me.vertices), "faces": len(me.polygons),
                "dimensions": [round(x, 4) for x in ob.dimensions], "material": mat.name if mat else None}
        if mat and mat.use_nodes:
            bsdf = next((n for n in mat.node_tree.nodes if n.type == "BSDF_PRINCIPLED"), None)
            if bsdf:
                info["metallic"] = bsdf.inputs["Metallic"].default_value
                info["roughness"] = bsdf.inputs["Roughness"].default_value
                link = bsdf.inputs["Base Color"].links
                info["base_color_from"] = link[0].from_node.type if link else None
                if link and link[0].from_node.type == "TEX_IMAGE":
                    img = link[0].from_node.image
                    info["texture"] = [img.size[0], img.size[1]]
        info["custom_normals"] = bool(getattr(me, "has_custom_normals", False))
        out.append(info)
    print("BLENDER_CHECK " + json.dumps({"file": path, "meshes": out}))


for p in sys.argv[sys.argv.index("--") + 1:]:
    check(p)

