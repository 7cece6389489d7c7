"""The registries: resolved arguments, modules found without __init__ lines, cheap import, exporters, prompt sets."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from att3d.registry import EXPORTERS, FIELDS, MAPPINGS, PROMPT_SETS, RENDERERS, TEXT_ENCODERS, Registry

MAPPING_BUILD_ARGS = ("text_len", "text_dim", "out_shapes")


def test_resolve_fills_in_every_default_and_applies_the_given_values():
    r = FIELDS.resolve("grid", hidden_dim=8, resolutions=(4, 8))
    import inspect

    from att3d.field import GridField

    assert list(r) == [k for k in inspect.signature(GridField).parameters]  # every argument, signature order
    assert r["hidden_dim"] == 8 and r["resolutions"] == [4, 8]  # given (the tuple as a JSON list)
    assert r["latent_dim"] == 16 and r["density_activation"] == "softplus"  # defaults
    assert json.loads(json.dumps(r)) == r


def test_resolve_excludes_build_time_arguments_and_rebuilds_the_same_module():
    kw = {"hidden_dim": 8, "use_tokens": False}
    r = MAPPINGS.resolve("hypernetwork", exclude=MAPPING_BUILD_ARGS, **kw)
    assert not set(MAPPING_BUILD_ARGS) & set(r)
    assert r == {"hidden_dim": 8, "use_tokens": False, "layer_norm": True, "output_scale": 1.0,
                 "n_power_iterations": 1}
    build = {"text_len": 4, "text_dim": 6, "out_shapes": {"grid": (10,)}}
    torch.manual_seed(0)
    a = MAPPINGS.build("hypernetwork", **build, **kw)
    torch.manual_seed(0)
    b = MAPPINGS.build("hypernetwork", **build, **r)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_resolve_of_factories_and_renderers():
    assert TEXT_ENCODERS.resolve("minilm") == {"max_length": 16, "path": None}
    assert TEXT_ENCODERS.resolve("clip", max_length=20) == {"path": "openai/clip-vit-large-patch14", "max_length": 20}
    r = RENDERERS.resolve("volume", backend="torch")
    assert r["backend"] == "torch" and r["region"] == "sphere" and r["sphere_radius"] == 1.0


def test_resolve_rejects_unknown_missing_and_unserialisable_arguments():
    with pytest.raises(TypeError, match="no argument.*hiden_dim"):
        FIELDS.resolve("grid", hiden_dim=8)
    with pytest.raises(TypeError, match="missing the required argument 'text_len'"):
        MAPPINGS.resolve("hypernetwork")
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        FIELDS.resolve("grid", bound=torch.tensor(1.0))
    with pytest.raises(KeyError, match="unknown field 'nope'; choose one of: grid"):
        FIELDS.resolve("nope")


def test_resolve_keeps_the_keywords_of_a_kwargs_factory():
    reg = Registry("thing")

    @reg.register("t")
    def make(size: int = 3, **extra):
        return size, extra

    assert reg.resolve("t", colour=(1, 2)) == {"size": 3, "colour": [1, 2]}


def test_a_new_module_of_the_package_is_found_without_an_init_line(tmp_path, monkeypatch):
    pkg = tmp_path / "plugpkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")  # imports nothing
    (pkg / "sub" / "__init__.py").write_text("")
    body = """
        from plugreg import REG

        @REG.register("{name}")
        class Part:
            def __init__(self, width: int = 2):
                self.width = width
    """
    (pkg / "alpha.py").write_text(textwrap.dedent(body.format(name="alpha")))
    (pkg / "sub" / "beta.py").write_text(textwrap.dedent(body.format(name="beta")))
    (tmp_path / "plugreg.py").write_text(
        "from att3d.registry import Registry\nREG = Registry('part', ('plugpkg',))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for m in [m for m in sys.modules if m.startswith(("plugpkg", "plugreg"))]:
        monkeypatch.delitem(sys.modules, m)
    from plugreg import REG

    assert REG.names() == ["alpha", "beta"]
    assert REG.build("beta", width=5).width == 5
    assert REG.resolve("alpha") == {"width": 2}


def test_registering_a_second_entry_under_a_name_is_an_error():
    reg = Registry("thing")
    reg.register("a")(dict)
    reg.register("a")(dict)  # the same object again is fine (a re-imported module)
    with pytest.raises(KeyError, match="registered twice"):
        reg.register("a")(list)


def test_importing_the_registry_does_not_import_torch():
    code = "import sys, att3d.registry; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_builtin_names():
    assert {"grid"} <= set(FIELDS.names())
    assert {"hypernetwork", "concat"} <= set(MAPPINGS.names())
    assert {"volume"} <= set(RENDERERS.names())
    assert {"minilm", "clip", "t5"} <= set(TEXT_ENCODERS.names())
    assert EXPORTERS.names() == ["glb", "obj", "ply"]
    assert {"shapes64", "shapes64_train", "shapes64_heldout"} <= set(PROMPT_SETS.names())


def test_mesh_formats_come_from_the_exporters():
    from att3d.mesh import export

    assert export.FORMATS == tuple(EXPORTERS.names())
    from att3d.mesh.export import FORMATS

    assert FORMATS == ("glb", "obj", "ply")
    with pytest.raises(ValueError, match=r"unknown mesh format 'stl'.*\('glb', 'obj', 'ply'\)"):
        export.export_mesh(None, "x.stl")


def test_prompt_sets_are_the_worlds_captions():
    from att3d.text.prompts import PromptError, builtin_prompts, resolve_prompts
    from att3d.world import shapes

    assert resolve_prompts("shapes64") == shapes.all_captions() and len(shapes.all_captions()) == 64
    assert resolve_prompts("shapes64_train") == shapes.train_captions() and len(shapes.train_captions()) == 56
    assert resolve_prompts("shapes64_heldout") == shapes.heldout_captions() == [
        "a red sphere", "a orange cube", "a yellow cylinder", "a green cone", "a blue torus", "a purple pyramid",
        "a pink capsule", "a gray octahedron"]
    with pytest.raises(PromptError, match="unknown prompt set 'shapes65'; built-in sets: shapes64, shapes64_train, "
                                          "shapes64_heldout"):
        builtin_prompts("shapes65")
