"""The unseen-word evaluation set (shared/WORLD.md, "Unseen words"; att3d.eval.paraphrase.build_unseen): size,
dev/final split, coverage, every prompt outside the vocabulary, file in sync with the code, and
``att3d eval paraphrase --set unseen`` on a tiny model."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from _tiny import tiny_config

from att3d.cli._args import UsageError
from att3d.cli.eval import paraphrase_main
from att3d.eval import paraphrase as pp
from att3d.model import AmortizedModel
from att3d.world.shapes import COLOUR_NAMES, SHAPE_NAMES, all_captions, heldout_objects
from att3d.world.wordings import COLOUR_WORDS, SHAPE_WORDS, TEMPLATES, all_wordings

UNSEEN_FILE = Path(__file__).resolve().parents[1] / pp.UNSEEN_TABLE


def tokens(text: str) -> list[str]:
    """Lower-case words and numbers (hyphens and punctuation split words: 'square-based' -> square, based)."""
    return re.findall(r"[a-z0-9]+", text.lower())


#: Every token of WORLD.md's vocabulary: the templates' words, every colour and shape word, and the article 'an'.
VOCABULARY = ({t for tpl in TEMPLATES for t in tokens(tpl.replace("{colour}", " ").replace("{shape}", " "))}
              | {t for ws in COLOUR_WORDS.values() for w in ws for t in tokens(w)}
              | {t for ws in SHAPE_WORDS.values() for w in ws for t in tokens(w)} | {"an"})


@pytest.fixture(scope="module")
def built() -> list[pp.UnseenWording]:
    return pp.build_unseen_wordings()


@pytest.fixture(scope="module")
def table() -> list[pp.Paraphrase]:
    return pp.build_unseen()


def test_vocabulary_tokens_are_the_lists():
    assert {"a", "the", "one", "that", "is", "colored", "3d", "model", "of", "render", "on", "white", "background",
            "simple"} <= VOCABULARY
    assert {"red", "forest", "green", "square", "block", "bipyramid", "an"} <= VOCABULARY
    assert not {"maroon", "ball", "picture", "grey", "coloured"} & VOCABULARY


def test_size_and_split(table):
    assert len(table) >= 200 and len(table) == 256
    assert len({p.prompt.lower() for p in table}) == len(table)  # no repeats
    splits = Counter(p.subset for p in table)
    assert set(splits) == {"dev", "final"} and abs(splits["dev"] - splits["final"]) <= 0.1 * len(table)
    assert Counter(p.kind for p in table) == {k: 64 for k in pp.UNSEEN_KINDS}
    for split in pp.UNSEEN_SPLITS:
        part = [p for p in table if p.subset == split]
        assert Counter(p.kind for p in part) == {k: 32 for k in pp.UNSEEN_KINDS}, split
        for kind in pp.UNSEEN_KINDS:  # stratified: every kind covers every shape and colour in both splits
            sel = [p for p in part if p.kind == kind]
            assert Counter(p.obj.shape for p in sel) == {s: 4 for s in SHAPE_NAMES}, (split, kind)
            assert Counter(p.obj.colour for p in sel) == {c: 4 for c in COLOUR_NAMES}, (split, kind)
        assert sum(p.obj in set(heldout_objects()) for p in part) == 16, split
        assert {p.split for p in part} == {"train", "heldout"}


def test_ground_truth_covers_every_shape_and_colour(table):
    assert {p.obj.shape for p in table} == set(SHAPE_NAMES)
    assert {p.obj.colour for p in table} == set(COLOUR_NAMES)
    for kind in pp.UNSEEN_KINDS:  # each kind names every object once
        assert sorted(p.caption for p in table if p.kind == kind) == sorted(all_captions())


def test_every_prompt_has_a_word_outside_the_vocabulary(table):
    missing = [p.prompt for p in table if not set(tokens(p.prompt)) - VOCABULARY]
    assert not missing, missing
    seen = {w.lower() for w in all_wordings()} | {c.lower() for c in all_captions()}
    assert not [p.prompt for p in table if p.prompt.lower() in seen]


def test_unseen_words_are_outside_the_lists():
    for colour, words in pp.UNSEEN_COLOUR_WORDS.items():
        assert colour in COLOUR_NAMES and len(words) >= 3
        for w in words:
            assert set(tokens(w)) - VOCABULARY, w
    for shape, words in pp.UNSEEN_SHAPE_WORDS.items():
        assert shape in SHAPE_NAMES and len(words) >= 3
        for w in words:
            assert set(tokens(w)) - VOCABULARY, w
    for t in pp.UNSEEN_TEMPLATES:
        assert "{colour}" in t and "{shape}" in t and t not in TEMPLATES
        assert set(tokens(t.replace("{colour}", " ").replace("{shape}", " "))) - VOCABULARY, t
    every = [w for ws in pp.UNSEEN_COLOUR_WORDS.values() for w in ws]
    assert len(every) == len(set(every))
    every = [w for ws in pp.UNSEEN_SHAPE_WORDS.values() for w in ws]
    assert len(every) == len(set(every))


def test_each_kind_makes_its_part_unseen(built):
    listed_colours = {w for ws in COLOUR_WORDS.values() for w in ws}
    listed_shapes = {w for ws in SHAPE_WORDS.values() for w in ws}
    for u in built:
        p = u.paraphrase
        expected = {"colour word": ("colour",), "shape word": ("shape",), "template": ("template",)}.get(p.kind)
        assert u.unseen == expected if expected else len(u.unseen) >= 2, u
        assert (u.colour_word in pp.UNSEEN_COLOUR_WORDS[p.obj.colour]) == ("colour" in u.unseen), u
        assert (u.colour_word in COLOUR_WORDS[p.obj.colour]) == ("colour" not in u.unseen), u
        assert (u.shape_word in pp.UNSEEN_SHAPE_WORDS[p.obj.shape]) == ("shape" in u.unseen), u
        assert (u.shape_word in SHAPE_WORDS[p.obj.shape]) == ("shape" not in u.unseen), u
        assert (u.template in pp.UNSEEN_TEMPLATES) == ("template" in u.unseen), u
        assert (u.template in TEMPLATES) == ("template" not in u.unseen), u
        assert u.colour_word not in listed_colours - set(COLOUR_WORDS[p.obj.colour])
        assert u.shape_word not in listed_shapes - set(SHAPE_WORDS[p.obj.shape])
    combos = Counter(u.unseen for u in built if u.paraphrase.kind == "several")
    assert len(combos) == 4 and set(combos.values()) == {16}
    used = Counter(u.template for u in built)
    for split in pp.UNSEEN_SPLITS:  # every template, listed or unseen, is used in both splits
        assert {u.template for u in built if u.paraphrase.subset == split} == set(TEMPLATES) | set(pp.UNSEEN_TEMPLATES)
    assert all(used[t] >= 4 for t in pp.UNSEEN_TEMPLATES)


def test_the_splits_are_matched(built):
    """dev and final hold the same (kind, colour word, template, parts) and (kind, shape word, template, parts)
    combinations: each 2 x 2 block of objects puts two prompts in each split, with the same template and words."""
    def profile(split: str, word: str) -> Counter:
        return Counter((u.paraphrase.kind, getattr(u, word), u.template, u.unseen) for u in built
                       if u.paraphrase.subset == split)

    for word in ("colour_word", "shape_word"):
        assert profile("dev", word) == profile("final", word), word
        assert len(profile("dev", word)) >= 64  # not a handful of combinations repeated


def test_no_prompt_names_another_object(built):
    """Once its own colour and shape phrases are taken out, a prompt holds no colour or shape word of any object."""
    words = {w for ws in [*COLOUR_WORDS.values(), *SHAPE_WORDS.values(), *pp.UNSEEN_COLOUR_WORDS.values(),
                          *pp.UNSEEN_SHAPE_WORDS.values()] for w in ws}
    for u in built:
        rest = " ".join(tokens(u.paraphrase.prompt))
        for phrase in (u.shape_word, u.colour_word):
            rest = re.sub(rf"\b{re.escape(' '.join(tokens(phrase)))}\b", " ", rest, count=1)
        leaks = [w for w in words if re.search(rf"\b{re.escape(' '.join(tokens(w)))}\b", rest)]
        assert not leaks, (u.paraphrase.prompt, leaks)


def test_articles(table):
    for p in table:
        for a, nxt in zip(p.prompt.split()[:-1], p.prompt.split()[1:]):
            if a in ("a", "an"):
                assert a == ("an" if nxt[0] in "aeiou" else "a"), p.prompt
    assert "an amber colored spire" in {p.prompt for p in table}


def test_table_file_matches_the_code(table):
    assert UNSEEN_FILE.read_text() == pp.format_table(table)
    assert pp.read_table(UNSEEN_FILE) == table
    assert pp.build_unseen() == table  # deterministic
    assert pp.build_set("unseen") == table and pp.build_set("paraphrases") == pp.build_paraphrases()
    with pytest.raises(pp.ParaphraseError, match="unknown set"):
        pp.build_set("nonsense")


def test_parse_table_with_a_split_column():
    rows = pp.parse_table("a maroon cube\ta red cube\tcolour word\tdev\n")
    assert rows[0].subset == "dev" and rows[0].kind == "colour word"
    with pytest.raises(pp.ParaphraseError, match="split must be dev or final"):
        pp.parse_table("a maroon cube\ta red cube\tcolour word\ttest\n")
    with pytest.raises(pp.ParaphraseError, match=":2: every line needs 4 columns"):
        pp.parse_table("a maroon cube\ta red cube\tcolour word\tdev\na navy cube\ta blue cube\tcolour word\n")
    with pytest.raises(pp.ParaphraseError, match="kind\\[<TAB>split\\]"):
        pp.parse_table("a maroon cube\ta red cube\tcolour word\tdev\textra\n")


def test_select_keeps_both_splits(table):
    some = pp.select(table, 8)
    assert Counter(p.subset for p in some) == {"dev": 8, "final": 8}
    assert all(Counter(p.kind for p in some if p.subset == s) == {k: 2 for k in pp.UNSEEN_KINDS}
               for s in pp.UNSEEN_SPLITS)
    assert pp.select(table, 0) == table


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = AmortizedModel(tiny_config()).eval()
    return model.save_pretrained(tmp_path_factory.mktemp("unseen") / "model")


def test_cli_scores_both_splits_apart(ckpt, tmp_path, capsys):
    out = tmp_path / "unseen"
    assert paraphrase_main(["--checkpoint", str(ckpt), "--set", "unseen", "--out", str(out), "--max-prompts", "1",
                            "--kinds", "colour word", "--resolution", "16", "--no-canonical"]) == 0
    printed = capsys.readouterr().out
    data = json.loads((out / "paraphrase.json").read_text())
    assert data["settings"]["set"] == "unseen" and data["settings"]["split"] == "both"
    assert [r["subset"] for r in data["rows"]] == ["dev", "final"]
    assert {r["kind"] for r in data["rows"]} == {"colour word"}
    assert set(data["by_subset"]) == {"dev", "final"}
    for s in ("dev", "final"):
        assert data["by_subset"][s]["summary"]["all"]["count"] == 1
    text = (out / "paraphrase.md").read_text()
    assert text in printed
    assert "### Unseen words, dev split (1 prompts" in text and "### Unseen words, final split (1 prompts" in text
    assert text.index("dev split") < text.index("final split") and "| kind | objects | prompts |" in text


def test_cli_one_split_and_errors(ckpt, tmp_path, capsys):
    out = tmp_path / "dev"
    assert paraphrase_main(["--checkpoint", str(ckpt), "--set", "unseen", "--split", "dev", "--out", str(out),
                            "--max-prompts", "2", "--resolution", "16", "--no-canonical"]) == 0
    data = json.loads((out / "paraphrase.json").read_text())
    assert [r["subset"] for r in data["rows"]] == ["dev", "dev"] and list(data["by_subset"]) == ["dev"]
    assert "final split" not in (out / "paraphrase.md").read_text()
    with pytest.raises(UsageError, match="--split needs --set unseen"):
        paraphrase_main(["--checkpoint", str(ckpt), "--split", "dev"])
    with pytest.raises(pp.ParaphraseError, match="no split column"):
        paraphrase_main(["--checkpoint", str(ckpt), "--set", "unseen", "--paraphrases", pp.DEFAULT_TABLE])
    written = tmp_path / "unseen.txt"
    assert paraphrase_main(["--set", "unseen", "--write-table", str(written)]) == 0
    assert written.read_text() == UNSEEN_FILE.read_text()
    capsys.readouterr()


def test_the_wordings_set_is_every_heldout_wording_by_template():
    from att3d.world.wordings import TEMPLATES, heldout_wordings, train_wordings

    table = pp.build_set("wordings")
    assert [p.prompt for p in table] == heldout_wordings()  # 720, in the same order
    assert Counter(p.kind for p in table) == {t: 60 for t in TEMPLATES}  # 8 objects x 3 colour words x 2.5 shapes
    assert not {p.prompt for p in table} & set(train_wordings())
    assert all(p.split == "heldout" and not p.subset for p in table)
    assert len(pp.select(table, 24)) == 24 and {p.kind for p in pp.select(table, 24)} == set(TEMPLATES)
    # --max-prompts of the wordings set: every held-out object in every template
    some = pp.select_per_object(table, 96)
    assert len(some) == 96 and Counter((p.obj, p.kind) for p in some) == {(o, t): 1 for o in heldout_objects()
                                                                          for t in TEMPLATES}
    assert len(pp.select_per_object(table, 200)) == 192 and pp.select_per_object(table, 0) == table


def test_cli_scores_the_wordings_set(ckpt, tmp_path, capsys):
    out = tmp_path / "wordings"
    assert paraphrase_main(["--checkpoint", str(ckpt), "--set", "wordings", "--out", str(out), "--max-prompts", "2",
                            "--kinds", "a {shape} that is {colour}", "--resolution", "16", "--no-canonical"]) == 0
    data = json.loads((out / "paraphrase.json").read_text())
    assert data["settings"]["set"] == "wordings" and data["settings"]["paraphrases"] == "generated (wordings)"
    assert [r["kind"] for r in data["rows"]] == ["a {shape} that is {colour}"] * 2
    assert "a {shape} that is {colour}" in capsys.readouterr().out
    written = tmp_path / "wordings.txt"
    assert paraphrase_main(["--set", "wordings", "--write-table", str(written)]) == 0
    assert [p.prompt for p in pp.read_table(written)] == [p.prompt for p in pp.build_set("wordings")]
