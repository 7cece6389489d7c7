"""Prompt sets: normalisation, de-duplication, files, built-in sets and the embedding cache."""

from __future__ import annotations

import pytest
import torch

from att3d.text.encoders import TextEmbedding
from att3d.text.prompts import PromptBank, PromptError, normalize_prompt, read_prompt_file, resolve_prompts


def test_normalize_collapses_whitespace():
    assert normalize_prompt("  a   red\tcube \n") == "a red cube"


def test_empty_prompt_is_an_error():
    with pytest.raises(PromptError, match="empty prompt"):
        normalize_prompt("   ")


def test_prompt_file_skips_blank_comment_and_duplicate_lines(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a red cube\n\n# a comment\na  red cube\na blue torus\n")
    assert read_prompt_file(f) == ["a red cube", "a blue torus"]


def test_non_utf8_prompt_file_is_a_one_line_error(tmp_path):
    f = tmp_path / "bad.txt"
    f.write_bytes(b"a red cube\n\xff\xfe broken\n")
    with pytest.raises(PromptError, match="not UTF-8") as e:
        read_prompt_file(f)
    assert "\n" not in str(e.value)


def test_missing_prompt_file(tmp_path):
    with pytest.raises(PromptError, match="not found"):
        read_prompt_file(tmp_path / "nope.txt")


def test_builtin_sets():
    assert len(resolve_prompts("shapes64")) == 64
    train, held = resolve_prompts("shapes64_train"), resolve_prompts("shapes64_heldout")
    assert len(train) == 56 and len(held) == 8 and not set(train) & set(held)
    with pytest.raises(PromptError, match="unknown prompt set|not found"):
        resolve_prompts("shapes65")


def test_bank_embeddings_are_computed_once_and_cached_on_disk(tmp_path):
    calls = []

    def encode(prompts):
        calls.append(list(prompts))
        n = len(prompts)
        return TextEmbedding(torch.arange(n * 2 * 3, dtype=torch.float32).reshape(n, 2, 3),
                             torch.ones(n, 2, dtype=torch.bool), torch.zeros(n, 3))

    bank = PromptBank(["a red cube", "a blue torus", "a red cube"])
    assert len(bank) == 2
    e1 = bank.embeddings("fake", encode, tmp_path)
    e2 = bank.embeddings("fake", encode, tmp_path)
    assert e1 is e2 and len(calls) == 1
    fresh = PromptBank(["a red cube", "a blue torus"])
    e3 = fresh.embeddings("fake", encode, tmp_path)  # read back from the disk cache
    assert len(calls) == 1 and torch.equal(e3.tokens, e1.tokens) and e3.mask.dtype == torch.bool
