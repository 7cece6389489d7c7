"""The shapes world's vocabulary (WORLD.md, "Wordings"): the count, the split and the article rule."""

from __future__ import annotations

import pytest

from att3d.text.prompts import resolve_prompts
from att3d.world import wordings as w
from att3d.world.shapes import COLOUR_NAMES, SHAPE_NAMES, WorldObject, heldout_objects


def test_vocabulary_follows_world_md():
    assert len(w.TEMPLATES) == 12 and w.TEMPLATES[0] == "a {colour} {shape}"
    assert set(w.COLOUR_WORDS) == set(COLOUR_NAMES) and set(w.SHAPE_WORDS) == set(SHAPE_NAMES)
    assert all(len(v) == 3 for v in w.COLOUR_WORDS.values())
    assert sum(len(v) for v in w.SHAPE_WORDS.values()) == 20
    assert all(v[0] == k for d in (w.COLOUR_WORDS, w.SHAPE_WORDS) for k, v in d.items())


def test_counts_and_split():
    every, train, held = w.all_wordings(), w.train_wordings(), w.heldout_wordings()
    assert len(every) == len(set(every)) == 5760
    assert len(train) == 5040 and len(held) == 720
    assert set(train) | set(held) == set(every) and not set(train) & set(held)
    table = w.wordings_by_object()
    held_objects = set(heldout_objects())
    assert all(table[p] not in held_objects for p in train)  # no held-out object in training, in any wording
    assert {table[p] for p in held} == held_objects
    assert len({table[p] for p in train}) == 56


@pytest.mark.parametrize("prompt, obj", [
    ("an orange cube", ("cube", "orange")), ("an orb that is ruby", ("sphere", "red")),
    ("a render of an amethyst square block", ("cube", "purple")),
    ("an octahedron colored slate", ("octahedron", "gray")),
    ("a 3d model of an orange ring", ("torus", "orange")), ("a simple orange orb", ("sphere", "orange")),
    ("forest green lozenge", ("capsule", "green")), ("a can, lemon", ("cylinder", "yellow")),
    ("an amethyst colored hoop", ("torus", "purple")), ("the orange orb", ("sphere", "orange")),
])
def test_article_rule(prompt, obj):
    assert w.wordings_by_object()[prompt] == WorldObject(*obj)


def test_article_rule_only_in_wordings():
    every = set(w.all_wordings())
    assert "a orange cube" not in every and "an orange cube" in every  # the canonical caption keeps "a"
    assert not any(" a " + v in f" {p}" for p in every for v in "aeiou")
    assert w.apply_articles("a 3d model of a orb") == "a 3d model of an orb"


def test_prompt_sets_are_registered():
    assert resolve_prompts("shapes_wordings") == w.all_wordings()
    assert resolve_prompts("shapes_wordings_train") == w.train_wordings()
    assert resolve_prompts("shapes_wordings_heldout") == w.heldout_wordings()


def test_hydra_prompt_config():
    from att3d.config import compose

    cfg = compose("train", ["prompts=shapes_wordings"])
    assert cfg["prompts"]["train"] == "shapes_wordings_train" and cfg["prompts"]["eval"] == "shapes64"
