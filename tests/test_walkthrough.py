"""The chapter's walkthrough: its shapes, its tokens, its picture."""

import re

import numpy as np
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
    labels = walkthrough.token_labels(text, [enc.decode_single_token_bytes(t) for t in tokens])
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


def test_smollm2_mode_draws_the_most_decided_head_and_its_layer(tmp_path, capsys):
    one, grid = walkthrough.main_smollm2(tmp_path)
    printed = capsys.readouterr().out
    assert "'LL', 'M', '␣with', '␣me', '.', '郭 1/3', '郭 2/3', '郭 3/3', '同 1/2', '同 2/2'" in printed
    assert "[30, 9, 30, 30] = [layers, H, L, L]" in printed
    assert "drawn: layer 1, head 0," in printed  # it assembles characters from their byte pieces
    back = float(re.search(r"give (\S+) to the piece before", printed).group(1))
    assert back > 0.8, back
    assert one.stat().st_size > 10_000 and grid.stat().st_size > 10_000


def test_decided_head_sets_the_first_token_aside():
    weights = np.full((2, 3, 4, 4), 0.25)  # [layers, H, L, L], every row uniform
    weights[0, 1, :, 0] = 1.0  # a sink: decided, but on the first token
    weights[1, 2] = np.eye(4)  # every query looks at itself
    assert walkthrough.decided_head(weights)[:2] == (1, 2)
    decoder = walkthrough.byte_decoder()
    assert sorted(decoder.values()) == list(range(256)) and decoder["Ġ"] == ord(" ")
