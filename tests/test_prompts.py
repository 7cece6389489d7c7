"""Prompt sets: normalisation, de-duplication, files, built-in sets and the embedding cache."""

from __future__ import annotations

import codecs
import os
import re
import threading

import pytest
import torch

from att3d.text import prompts as prompts_module
from att3d.text.encoders import TextEmbedding
from att3d.text.prompts import (
    PREVIEW_CHARS,
    PromptBank,
    PromptError,
    normalize_prompt,
    normalize_prompts,
    read_prompt_file,
    resolve_prompts,
    shorten,
)


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


# -- one normalisation for every prompt (issue #19, item 9) -----------------------------------------------------

def test_normalize_refuses_control_characters_and_keeps_unicode_white_space_as_spaces():
    assert normalize_prompt("a\u2028red\u2029cube\x85now\x0cand\x0bthen\u00a0x") == "a red cube now and then x"
    assert normalize_prompt("\ufeffa red\ufeff cube") == "a red cube"
    assert normalize_prompt("un cube rouge e\u0301") == "un cube rouge \u00e9"  # NFC
    for ch, name in (("\x00", "U+0000 (NUL)"), ("\x1b", "U+001B (ESC)"), ("\x7f", "U+007F (DEL)"),
                     ("\x9b", "U+009B (CSI)")):
        with pytest.raises(PromptError, match=rf"control character {re.escape(name)} at character 3") as e:
            normalize_prompt(f"ab{ch}[31mred")
        assert ch not in str(e.value)
    with pytest.raises(PromptError, match="not valid UTF-8"):
        normalize_prompt("a red \udcff cube")  # a command-line byte that was not UTF-8 (surrogateescape)
    assert normalize_prompts(["a", " b "]) == ["a", "b"]
    with pytest.raises(PromptError, match="prompt 2: empty prompt"):
        normalize_prompts(["a", ""])


def test_prompt_file_encodings(tmp_path):
    f = tmp_path / "p.txt"
    f.write_bytes(codecs.BOM_UTF8 + b"a red cube\na red cube\n")
    assert read_prompt_file(f) == ["a red cube"]  # the BOM is gone, so the duplicate is one prompt
    for encoding in ("utf-16-le", "utf-16-be"):
        bom = codecs.BOM_UTF16_LE if encoding.endswith("le") else codecs.BOM_UTF16_BE
        f.write_bytes(bom + "a red cube\r\nun cube rouge é\r\n".encode(encoding))
        assert read_prompt_file(f) == ["a red cube", "un cube rouge é"]
        f.write_bytes("a red cube\nun cube rouge\n".encode(encoding))  # no BOM
        with pytest.raises(PromptError, match="looks like UTF-16 text without a byte-order mark") as e:
            read_prompt_file(f)
        assert "\x00" not in str(e.value)


def test_prompt_file_lines_end_at_newlines_only(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a red\x0ccube\r\na blue\x85ball\na green\u2028torus\u2029now\n\n# c\n", encoding="utf-8",
                 newline="")
    assert read_prompt_file(f) == ["a red cube", "a blue ball", "a green torus now"]


@pytest.mark.parametrize("ch, name", [("\x00", "NUL"), ("\x1b", "ESC"), ("\x08", "BACKSPACE")])
def test_prompt_file_control_characters_name_the_line(tmp_path, ch, name):
    f = tmp_path / "p.txt"
    f.write_text(f"a red cube\n# a comment\n\na blue{ch} ball\n", encoding="utf-8")
    with pytest.raises(PromptError, match=rf"p.txt line 4: holds the control character U\+00.. \({name}\)") as e:
        read_prompt_file(f)
    assert ch not in str(e.value) and "\n" not in str(e.value)


def test_prompt_file_folders_devices_pipes_and_size(tmp_path, monkeypatch):
    with pytest.raises(PromptError, match="is a folder, not a file"):
        read_prompt_file(tmp_path)
    with pytest.raises(PromptError, match="/dev/null holds no prompt"):
        read_prompt_file("/dev/null")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # like --prompts-file <(...)
    writer = threading.Thread(target=lambda: fifo.write_text("a red cube\n"))
    writer.start()
    assert read_prompt_file(fifo) == ["a red cube"]
    writer.join()
    monkeypatch.setattr(prompts_module, "MAX_PROMPT_FILE_BYTES", 16)
    big = tmp_path / "big.txt"
    big.write_text("a red cube\n" * 10)
    with pytest.raises(PromptError, match="is larger than"):
        read_prompt_file(big)


def test_shorten():
    assert shorten("a red cube") == "a red cube"
    cut = shorten("x" * 5000)
    assert len(cut) == PREVIEW_CHARS and cut.endswith("...")
