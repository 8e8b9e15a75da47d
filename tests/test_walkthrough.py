"""The chapter's walkthrough: its shapes, its tokens, its picture."""

import re

import walkthrough


def test_walkthrough_prints_the_chapter_shapes_and_writes_a_heatmap(tmp_path, capsys):
    path = walkthrough.main(tmp_path)
    printed = capsys.readouterr().out
    for shape in ("[4, 16, 768]", "[4, 16, 12, 64]", "[4, 12, 16, 64]", "[4, 12, 16, 16]"):
        assert shape in printed, shape
    error = float(re.search(r"max \|diff\| = (\S+)\)", printed).group(1))
    assert error < 1e-5, error  # the stages one by one == batched_attention
    assert path.exists() and path.stat().st_size > 10_000


def test_gpt2_tokens_of_the_chapter_sentence():
    enc = walkthrough.gpt2_tokenizer()
    text = walkthrough.SENTENCES[0]
    tokens = enc.encode(text)
    assert enc.decode(tokens) == text
    labels = walkthrough.token_labels(text, tokens, enc)
    assert labels[:2] == ["LL", "M"]  # the chapter's first two rows
    assert labels[5:7] == ["郭 1/2", "郭 2/2"]  # one CJK character, two byte-level tokens
    assert len(labels) == len(tokens)


def test_cjk_font_has_the_glyphs():
    import plotting
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    name = plotting.use_cjk_font()
    font = FT2Font(font_manager.findfont(font_manager.FontProperties(family=name)))
    assert all(font.get_char_index(ord(ch)) != 0 for ch in "郭同学热爱喜欢游戏")
