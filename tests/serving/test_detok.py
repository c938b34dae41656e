"""StreamText: streamed pieces concatenate to the full decode; stop strings are never leaked."""
import pytest

from llmquant.serving.detok import StreamText

TEXTS = [
    "plain ascii words, spaces and punctuation!",
    "multi-byte: héllo wörld — 東京 🚀🎉 ok",
    "  leading spaces\nnew lines\n\n\ttabs",
]


def stream(tok, ids, stop=()):
    st = StreamText(tok, stop)
    pieces = [st.push(t) for t in ids]
    pieces.append(st.finish())
    return pieces, st


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_concatenate_to_the_full_decode(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces, _ = stream(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert not any("\ufffd" in p for p in pieces)  # never half a character


def test_emoji_bytes_are_held_until_complete(tokenizer):
    ids = tokenizer.encode("🚀", add_special_tokens=False)
    assert len(ids) > 1  # byte-level BPE splits it; the first pieces must not be sent alone
    pieces, _ = stream(tokenizer, ids)
    assert pieces[:-2] == [""] * (len(ids) - 1) and "".join(pieces) == "🚀"


@pytest.mark.parametrize("stop", ["wörld", "d —", "🎉", "東"])
def test_stop_string_is_cut_and_never_sent(tokenizer, stop):
    text = TEXTS[1]
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces, st = stream(tokenizer, ids, stop=("zzz-not-there", stop))
    assert st.stopped
    assert "".join(pieces) == text[: text.index(stop)]
    sent = ""
    for p in pieces:
        sent += p
        assert stop not in sent


def test_held_prefix_is_released_when_it_does_not_become_a_stop(tokenizer):
    ids = tokenizer.encode("abc abd", add_special_tokens=False)
    pieces, st = stream(tokenizer, ids, stop=("abx",))
    assert not st.stopped and "".join(pieces) == "abc abd"
