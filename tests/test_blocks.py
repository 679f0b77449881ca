import pytest

from kvtransfer.blocks import adapter_seed, local_block_hashes, sequence_block_hashes

pytestmark = pytest.mark.unit


def test_golden_vector() -> None:
    tokens = list(range(40))
    assert local_block_hashes(tokens, 16) == [0xD47A8F41C833328A, 0xD43939178ABD00DB]
    assert sequence_block_hashes(tokens, 16) == [0xD47A8F41C833328A, 0xBF15DFFB16447F38]


def test_partial_block_not_hashed_and_prefix_stable() -> None:
    assert sequence_block_hashes(list(range(15))) == []
    a = sequence_block_hashes(list(range(48)))
    b = sequence_block_hashes(list(range(32)) + [7] * 16)
    assert a[:2] == b[:2] and a[2] != b[2]


def test_chaining_from_parent_equals_whole() -> None:
    tokens = list(range(64))
    head = sequence_block_hashes(tokens[:32])
    assert head + sequence_block_hashes(tokens[32:], parent=head[-1]) == sequence_block_hashes(tokens)


def test_adapter_changes_hashes() -> None:
    assert adapter_seed(None) == 1337
    assert sequence_block_hashes(list(range(16)), adapter="lora-a") != sequence_block_hashes(list(range(16)))
