"""Router text path: tokenizer (equals transformers), incremental detokenizer, stop strings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from router.detokenizer import IncrementalDetokenizer
from router.stop_strings import StopStringMatcher
from router.tokenizer import ChatTemplateError, Tokenizer

TEXTS = [
    "Hello, world!",
    "  leading spaces and\ttabs\nnewlines",
    "héllo wörld — naïve café ☕ 日本語のテキスト 🤖🚀",
    "def f(x):\n    return x ** 2  # code",
    "",
]


@pytest.fixture(scope="module")
def tok(default_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(default_model_dir)


@pytest.fixture(scope="module")
def hf_tok(default_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.mark.e2e
@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_equal_transformers(tok: Tokenizer, hf_tok, text: str) -> None:
    ids = hf_tok.encode(text, add_special_tokens=False)
    assert tok.encode(text) == ids
    assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)


@pytest.mark.e2e
@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "and 3+3? ☕"},
        ],
    ],
)
def test_chat_template_equals_transformers(tok: Tokenizer, hf_tok, messages) -> None:
    expected = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(expected, dict) or hasattr(expected, "input_ids"):
        expected = expected["input_ids"]
    assert tok.apply_chat_template(messages) == list(expected)


@pytest.mark.e2e
def test_eos_and_no_template(tok: Tokenizer, default_model_dir: Path) -> None:
    assert tok.eos_token_ids == [tok.token_to_id("<|im_end|>")]
    bare = Tokenizer(tok._tok, None, {})
    with pytest.raises(ChatTemplateError, match="no chat template"):
        bare.apply_chat_template([{"role": "user", "content": "x"}])
    raising = Tokenizer(tok._tok, "{{ raise_exception('roles must alternate') }}", {})
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        raising.apply_chat_template([{"role": "user", "content": "x"}])


@pytest.mark.e2e
@pytest.mark.parametrize("text", TEXTS[:4])
def test_incremental_detokenizer_matches_full_decode(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    for step in (1, 2, 5):
        detok = IncrementalDetokenizer(tok)
        pieces = [detok.add(ids[i : i + step]) for i in range(0, len(ids), step)]
        pieces.append(detok.flush())
        assert "".join(pieces) == tok.decode(ids)
        assert all("\ufffd" not in p for p in pieces)


@pytest.mark.e2e
def test_detokenizer_skips_special_tokens_and_holds_partial_utf8(tok: Tokenizer) -> None:
    ids = [*tok.encode("hi"), tok.token_to_id("<|im_end|>")]
    detok = IncrementalDetokenizer(tok)
    assert detok.add(ids) + detok.flush() == "hi"
    # an emoji is several byte-level tokens: nothing comes out until it is complete
    emoji = tok.encode("🤖")
    assert len(emoji) > 1
    detok = IncrementalDetokenizer(tok)
    assert [detok.add([t]) for t in emoji[:-1]] == [""] * (len(emoji) - 1)
    assert detok.add(emoji[-1:]) == "🤖"
    # cut mid-character: flush gives the replacement character instead of hanging on to it
    detok = IncrementalDetokenizer(tok)
    assert detok.add(emoji[:1]) == ""
    assert detok.flush() == "\ufffd"


def _run(matcher: StopStringMatcher, deltas: list[str]) -> tuple[str, bool]:
    out = []
    for d in deltas:
        text, hit = matcher.feed(d)
        out.append(text)
        if hit:
            return "".join(out), True
    return "".join(out) + matcher.flush(), False


@pytest.mark.unit
@pytest.mark.parametrize(
    "stops,deltas,expected",
    [
        (["END"], ["hello ", "world"], ("hello world", False)),
        (["END"], ["hello E", "N", "D more"], ("hello ", True)),
        (["END"], ["hello EN", "Z"], ("hello ENZ", False)),
        (["\n\n", "###"], ["a\n", "\nb"], ("a", True)),
        (["###", "##!"], ["x#", "#!y"], ("x", True)),
        (["abc"], ["ab"], ("ab", False)),  # held back, then flushed at the end
        (["a"], ["xa"], ("x", True)),
    ],
)
def test_stop_strings(stops, deltas, expected) -> None:
    assert _run(StopStringMatcher(stops), deltas) == expected


@pytest.mark.unit
def test_stop_strings_hold_back_only_possible_prefixes() -> None:
    m = StopStringMatcher(["STOP"])
    assert m.feed("abc S") == ("abc ", False)
    assert m.feed("x") == ("Sx", False)


@pytest.mark.unit
def test_router_text_path_does_not_import_torch(default_model_dir: Path) -> None:
    code = (
        "import sys; from router.tokenizer import Tokenizer; import router.detokenizer, "
        f"router.stop_strings; Tokenizer.from_dir({str(default_model_dir)!r}).encode('x'); "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
