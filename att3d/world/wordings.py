"""The shapes world's vocabulary (``shared/WORLD.md``, "Wordings"): the world's prompts in other words.

A *wording* of object (colour, shape) is one of :data:`TEMPLATES` with ``{colour}`` replaced by one of
:data:`COLOUR_WORDS` ``[colour]`` and ``{shape}`` by one of :data:`SHAPE_WORDS` ``[shape]``; in a wording
(not in the canonical caption ``a {colour} {shape}``) every article ``a`` becomes ``an`` before a word that
starts with a vowel letter (``an orange cube``, ``an orb``). 12 templates x 24 colour words x 20 shape
words = 5,760 distinct prompts (``shapes_wordings``); the training split holds the wordings of the 56
training objects only, so that a held-out object is never shown in any wording.
"""

from __future__ import annotations

from att3d.world.shapes import COLOUR_NAMES, SHAPE_NAMES, WorldObject, heldout_objects

#: The 12 templates, the canonical caption's first.
TEMPLATES: tuple[str, ...] = (
    "a {colour} {shape}",
    "the {colour} {shape}",
    "one {colour} {shape}",
    "a {shape} that is {colour}",
    "a {colour} colored {shape}",
    "a {shape} colored {colour}",
    "a 3d model of a {colour} {shape}",
    "a render of a {colour} {shape}",
    "a {colour} {shape} on a white background",
    "{colour} {shape}",
    "a simple {colour} {shape}",
    "a {shape}, {colour}",
)

#: The words of each colour (the colour's own name first).
COLOUR_WORDS: dict[str, tuple[str, ...]] = {
    "red": ("red", "ruby", "cherry"),
    "orange": ("orange", "pumpkin", "carrot"),
    "yellow": ("yellow", "lemon", "mustard"),
    "green": ("green", "jade", "forest green"),
    "blue": ("blue", "cobalt", "sapphire"),
    "purple": ("purple", "plum", "amethyst"),
    "pink": ("pink", "bubblegum", "flamingo"),
    "gray": ("gray", "silver", "slate"),
}

#: The words of each shape (the shape's own name first).
SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "sphere": ("sphere", "orb", "globe"),
    "cube": ("cube", "block", "square block"),
    "cylinder": ("cylinder", "column", "can"),
    "cone": ("cone", "spire"),
    "torus": ("torus", "ring", "hoop"),
    "pyramid": ("pyramid", "square pyramid"),
    "capsule": ("capsule", "lozenge"),
    "octahedron": ("octahedron", "bipyramid"),
}

VOWELS = frozenset("aeiou")


def apply_articles(text: str) -> str:
    """``a`` -> ``an`` before a word that starts with a vowel letter (the wordings' article rule)."""
    words = text.split(" ")
    for i in range(len(words) - 1):
        if words[i] == "a" and words[i + 1][:1].lower() in VOWELS:
            words[i] = "an"
    return " ".join(words)


def wording(template: str, colour_word: str, shape_word: str) -> str:
    """One wording: the template filled in, with the article rule."""
    return apply_articles(template.format(colour=colour_word, shape=shape_word))


def object_wordings_by_template(obj: WorldObject) -> dict[str, str]:
    """``{wording: its template}`` of one object (template-major, then colour word, then shape word), without
    repeats (a wording two templates make keeps the first)."""
    out: dict[str, str] = {}
    for t in TEMPLATES:
        for c in COLOUR_WORDS[obj.colour]:
            for s in SHAPE_WORDS[obj.shape]:
                out.setdefault(wording(t, c, s), t)
    return out


def object_wordings(obj: WorldObject) -> list[str]:
    """Every wording of one object (template-major, then colour word, then shape word), without repeats."""
    return list(object_wordings_by_template(obj))


def wordings_by_object(objects: list[WorldObject] | None = None) -> dict[str, WorldObject]:
    """``{wording: its object}`` for ``objects`` (default: all 64, in the world's shape-major order)."""
    objects = [WorldObject(s, c) for s in SHAPE_NAMES for c in COLOUR_NAMES] if objects is None else objects
    table: dict[str, WorldObject] = {}
    for obj in objects:
        for w in object_wordings(obj):
            if table.setdefault(w, obj) != obj:  # pragma: no cover - the vocabulary is unambiguous (tested)
                raise ValueError(f"wording {w!r} names two objects")
    return table


def all_wordings() -> list[str]:
    """``shapes_wordings``: the 5,760 distinct wordings of the 64 objects."""
    return list(wordings_by_object())


def train_wordings() -> list[str]:
    """The wordings of the 56 training objects (no held-out object in any wording): 5,040 prompts."""
    held = set(heldout_objects())
    return [w for w, o in wordings_by_object().items() if o not in held]


def heldout_wordings() -> list[str]:
    """The wordings of the 8 held-out objects: 720 prompts."""
    return list(wordings_by_object(heldout_objects()))
