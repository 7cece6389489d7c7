"""The shapes world's named prompt sets, registered in ``att3d.registry.PROMPT_SETS``.

A config names them (``prompts.train: shapes64_train``) and :func:`att3d.text.prompts.resolve_prompts` looks
them up there; a new set is one more ``@PROMPT_SETS.register(name)`` function returning its prompts.
"""

from __future__ import annotations

from att3d.registry import PROMPT_SETS
from att3d.world import shapes


@PROMPT_SETS.register("shapes64")
def shapes64() -> list[str]:
    """All 64 captions ``a {colour} {shape}``, shape-major (:func:`att3d.world.shapes.all_captions`)."""
    return shapes.all_captions()


@PROMPT_SETS.register("shapes64_train")
def shapes64_train() -> list[str]:
    """The 56 training captions: all but the held-out diagonal (shape i, colour i)."""
    return shapes.train_captions()


@PROMPT_SETS.register("shapes64_heldout")
def shapes64_heldout() -> list[str]:
    """The 8 held-out captions (shape i, colour i)."""
    return shapes.heldout_captions()


@PROMPT_SETS.register("shapes_wordings")
def shapes_wordings() -> list[str]:
    """Every distinct wording of the 64 objects (WORLD.md, "Wordings"): 5,760 prompts."""
    from att3d.world.wordings import all_wordings

    return all_wordings()


@PROMPT_SETS.register("shapes_wordings_train")
def shapes_wordings_train() -> list[str]:
    """The wordings of the 56 training objects: 5,040 prompts (no held-out object in any wording)."""
    from att3d.world.wordings import train_wordings

    return train_wordings()


@PROMPT_SETS.register("shapes_wordings_heldout")
def shapes_wordings_heldout() -> list[str]:
    """The wordings of the 8 held-out objects: 720 prompts."""
    from att3d.world.wordings import heldout_wordings

    return heldout_wordings()
