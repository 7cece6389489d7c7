"""att3d.eval.paraphrase: the paraphrase table (valid objects, never a training caption, file in sync with the
code) and its evaluation on a tiny model."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from _tiny import tiny_config

from att3d.cli.eval import paraphrase_main
from att3d.eval import paraphrase as pp
from att3d.eval.model_eval import evaluate
from att3d.model import AmortizedModel
from att3d.world.shapes import COLOUR_NAMES, SHAPE_NAMES, WorldObject, all_captions, all_objects

TABLE_FILE = Path(__file__).resolve().parents[1] / pp.DEFAULT_TABLE
TINY_CONFIG = tiny_config()


@pytest.fixture(scope="module")
def table() -> list[pp.Paraphrase]:
    return pp.build_paraphrases()


@pytest.fixture(scope="module")
def model() -> AmortizedModel:
    torch.manual_seed(0)
    return AmortizedModel(TINY_CONFIG).eval()


def _words(text: str) -> set[str]:
    return set(re.split(r"[ -]", text.lower()))


def test_every_paraphrase_names_a_valid_object_and_is_never_a_caption(table):
    objects = set(all_objects())
    captions = {c.lower() for c in all_captions()}
    assert all(p.obj in objects for p in table)
    assert not [p.prompt for p in table if p.prompt.lower() in captions]
    assert len({p.prompt.lower() for p in table}) == len(table)  # no repeats
    counts = Counter(p.kind for p in table)
    assert counts == {"article": 8, **{k: 64 for k in pp.KINDS if k != "article"}}
    for kind in pp.KINDS[1:]:  # every object once per kind
        assert sorted(p.caption for p in table if p.kind == kind) == sorted(all_captions())
    assert {p.split for p in table} == {"train", "heldout"}
    assert sum(p.split == "heldout" for p in table if p.kind == "template") == 8


def test_rewordings_replace_the_canonical_words(table):
    for p in table:
        words = _words(p.prompt)
        colour_syn = p.kind in ("colour synonym", "both synonyms", "synonyms + template")
        shape_syn = p.kind in ("shape synonym", "both synonyms", "synonyms + template")
        assert (p.obj.colour in words) != colour_syn, p
        assert (p.obj.shape in words) != shape_syn or p.obj.shape == "pyramid", p  # 'square pyramid' keeps it
        if colour_syn:
            assert words & set(pp.COLOUR_SYNONYMS[p.obj.colour]), p
            assert not words & set(COLOUR_NAMES), p  # no other canonical colour leaks in
        if shape_syn:
            assert any(s in p.prompt for s in pp.SHAPE_SYNONYMS[p.obj.shape]), p
    used = " ".join(p.prompt for p in table)
    for syn in [s for v in pp.COLOUR_SYNONYMS.values() for s in v] + [s for v in pp.SHAPE_SYNONYMS.values()
                                                                      for s in v]:
        assert re.search(rf"\b{re.escape(syn)}\b", used), f"synonym {syn!r} is never used"
    for t in pp.TEMPLATES:
        pattern = re.escape(t).replace(r"\{a\}", "(a|an)").replace(r"\{colour\}", r"\S+").replace(r"\{shape\}", ".+")
        assert sum(bool(re.fullmatch(pattern, p.prompt)) for p in table if p.kind == "template") >= 16, t


def test_articles():
    assert pp.article("amber") == "an" and pp.article("red") == "a" and pp.article("orb") == "an"
    assert pp.fill("{a} {shape} that is {colour}", "red", "octahedron") == "an octahedron that is red"
    assert pp.fill("{a} {colour}-coloured {shape}", "orange", "cube") == "an orange-coloured cube"
    assert pp.fill("the {colour} {shape}", "azure", "orb") == "the azure orb"


def test_table_file_matches_the_code(table):
    assert TABLE_FILE.read_text() == pp.format_table(table)
    assert pp.read_table(TABLE_FILE) == table
    assert pp.build_paraphrases() == table  # deterministic


def test_parse_table_rejects_bad_lines():
    with pytest.raises(pp.ParaphraseError, match=":2:"):
        pp.parse_table("# c\na crimson cube\ta red cube\n")
    with pytest.raises(pp.ParaphraseError, match="not a shapes-world caption"):
        pp.parse_table("a crimson cube\ta red dragon\tcolour synonym\n")
    with pytest.raises(pp.ParaphraseError, match="repeated"):
        pp.parse_table("a crimson cube\ta red cube\tx\na  crimson cube\ta red cube\ty\n")
    with pytest.raises(pp.ParaphraseError, match="no paraphrase"):
        pp.parse_table("# nothing\n\n")
    rows = pp.parse_table("  a  crimson cube \ta red cube\tcolour synonym\n")
    assert rows == [pp.Paraphrase("a crimson cube", WorldObject("cube", "red"), "colour synonym")]


def test_select_spreads_over_kinds(table):
    assert pp.select(table, 0) == table and pp.select(table, 10_000) == table
    some = pp.select(table, 41)
    assert len(some) == 41 and pp.select(table, 41) == some
    counts = Counter(p.kind for p in some)
    assert counts["article"] == 1 and all(counts[k] == 8 for k in pp.KINDS[1:])
    assert [table.index(p) for p in some] == sorted(table.index(p) for p in some)  # order kept
    assert len(pp.select(table, 2)) == 2


@pytest.fixture(scope="module")
def two(table) -> list[pp.Paraphrase]:
    return [next(p for p in table if p.kind == "colour synonym" and p.obj == WorldObject("cube", "red")),
            next(p for p in table if p.kind == "shape synonym" and p.obj == WorldObject("sphere", "red"))]


def test_evaluation_on_a_tiny_model(model, two):
    res = pp.evaluate_paraphrases(model, two, resolution=16, progress=False)
    rows = res["rows"]
    assert [r["prompt"] for r in rows] == [p.prompt for p in two]
    assert [r["kind"] for r in rows] == ["colour synonym", "shape synonym"]
    assert [r["split"] for r in rows] == ["train", "heldout"]  # 'a red sphere' is held out
    for r in rows:
        assert 0.0 <= r["volume_iou"] <= 1.0 and 0.0 <= r["colour_error"] <= 1.0
        assert r["best_match"] in all_captions()
        assert r["retrieved"] == (r["best_match"] == r["caption"])
        assert r["shape_correct"] == (r["best_match"].split()[2] == r["caption"].split()[2])
    assert sorted(res["canonical"]) == ["a red cube", "a red sphere"]
    summary = res["summary"]
    assert list(summary) == ["colour synonym", "shape synonym", "all"] and summary["all"]["count"] == 2
    assert summary["colour synonym"]["volume_iou"] == pytest.approx(rows[0]["volume_iou"])
    assert summary["colour synonym"]["canonical_volume_iou"] == pytest.approx(
        res["canonical"]["a red cube"]["volume_iou"])
    assert list(res["summary_by_split"]) == ["colour synonym | train", "shape synonym | heldout", "all"]
    text = pp.report(res)
    assert "| colour synonym | 1 |" in text and "| shape synonym | heldout | 1 |" in text
    assert "| all |  | 2 |" in text and "|---|---|---:|" in text


def test_scores_match_att3d_eval_model(model):
    """On canonical captions, scoring with given objects is exactly att3d eval model's computation."""
    prompts = ["a red cube", "a blue torus"]
    ours = pp.score_prompts(model, prompts, [WorldObject("cube", "red"), WorldObject("torus", "blue")], 16,
                            progress=False)
    ref = evaluate(model, prompts, resolution=16, progress=False)["per_prompt"]
    for a, b in zip(ours, ref):
        for k in ("volume_iou", "silhouette_iou", "colour_error", "retrieved", "best_match"):
            assert a[k] == b[k], k


def test_cli_end_to_end(model, tmp_path, capsys):
    ckpt = model.save_pretrained(tmp_path / "model")
    out = tmp_path / "para"
    assert paraphrase_main(["--checkpoint", str(ckpt), "--out", str(out), "--max-prompts", "2", "--kinds", "template",
                    "both synonyms", "--resolution", "16", "--no-canonical"]) == 0
    printed = capsys.readouterr().out
    data = json.loads((out / "paraphrase.json").read_text())
    assert len(data["rows"]) == 2 and {r["kind"] for r in data["rows"]} == {"template", "both synonyms"}
    assert data["canonical"] == {} and "canonical_volume_iou" not in data["summary"]["all"]
    assert (out / "paraphrase.md").read_text() in printed
    with pytest.raises(pp.ParaphraseError, match="no paraphrases of kind"):
        paraphrase_main(["--checkpoint", str(ckpt), "--kinds", "nonsense"])
    written = tmp_path / "table.txt"
    assert paraphrase_main(["--write-table", str(written)]) == 0
    assert written.read_text() == TABLE_FILE.read_text()
    assert set(SHAPE_NAMES) == set(pp.SHAPE_SYNONYMS) and set(COLOUR_NAMES) == set(pp.COLOUR_SYNONYMS)
