"""The standard-library docstring corpus: deterministic, parts disjoint, splits as documented, sequences and masking."""

from __future__ import annotations

import numpy as np
import pytest

from qgraph.models import text_corpus
from qgraph.models.text_corpus import (
    CLS_ID,
    MASK_ID,
    PAD_ID,
    PARTS,
    SEP_ID,
    SPECIAL_TOKENS,
    SPLITS,
    UNK_ID,
    Document,
    build_vocabulary,
    corpus_documents,
    corpus_vocabulary,
    mask_tokens,
    module_part,
    module_split,
    packed_sequences,
    token_windows,
)


def test_corpus_is_deterministic_and_has_no_repeated_text():
    documents = text_corpus.standard_library_documents()
    again = text_corpus.standard_library_documents.__wrapped__()
    assert documents == again
    assert len(documents) > 1000 and sum(len(document.text) for document in documents) > 500_000
    texts = [document.text for document in documents]
    assert len(set(texts)) == len(texts)
    assert documents[0].module == text_corpus.STANDARD_LIBRARY_MODULES[0]


def test_parts_and_splits_are_disjoint_and_follow_the_module_hash():
    modules: dict[tuple[str, str], set[str]] = {}
    texts: dict[tuple[str, str], set[str]] = {}
    for part in PARTS:
        for split in SPLITS:
            documents = corpus_documents(part, split)
            assert documents, (part, split)
            assert all(module_part(document.module) == part and module_split(document.module) == split
                       for document in documents)
            modules[part, split] = {document.module for document in documents}
            texts[part, split] = {document.text for document in documents}
    keys = list(modules)
    for index, first in enumerate(keys):
        for second in keys[index + 1:]:
            assert not modules[first] & modules[second], (first, second)
            assert not texts[first] & texts[second], (first, second)
    bucket = text_corpus.module_bucket("json")
    assert module_part("json") == PARTS[bucket % 2]
    with pytest.raises(ValueError, match="part must be"):
        corpus_documents("both", "train")


def test_vocabulary_specials_order_and_unknown_characters():
    vocabulary = corpus_vocabulary()
    assert vocabulary.tokens[:5] == SPECIAL_TOKENS
    characters = vocabulary.tokens[5:]
    assert list(characters) == sorted(characters) and all(len(token) == 1 for token in characters)
    assert {"a", "Z", " ", "\n", "(", "_"} <= set(characters)
    ids = vocabulary.encode("def f(x):\n")
    assert ids.dtype == np.int64 and vocabulary.decode(ids) == "def f(x):\n"
    assert vocabulary.encode("\u2603")[0] == UNK_ID  # a snowman is not in the docstrings
    counted = build_vocabulary([Document("m", "m", "aab")], minimum_count=2)
    assert counted.tokens == SPECIAL_TOKENS + ("a",)
    with pytest.raises(ValueError, match="special tokens"):
        text_corpus.CharacterVocabulary(("a",))


def test_packed_sequences_keep_document_order_and_pad():
    vocabulary = corpus_vocabulary()
    documents = [Document("m", "a", "abc"), Document("m", "b", "de"), Document("m", "c", "x" * 25)]
    input_ids, attention_mask = packed_sequences(documents, vocabulary, 10)
    assert input_ids.shape == attention_mask.shape and input_ids.shape[1] == 10
    assert (input_ids[:, 0] == CLS_ID).all()
    assert ((input_ids != PAD_ID) == (attention_mask == 1)).all()
    first = vocabulary.decode(input_ids[0][attention_mask[0] == 1])
    assert first == "[CLS]abc[SEP]de[SEP]"
    # the 25-character document is cut into pieces of at most length - 2 = 8 characters
    rest = "".join(vocabulary.decode(row[mask == 1]) for row, mask in zip(input_ids[1:], attention_mask[1:]))
    assert rest.replace("[CLS]", "").replace("[SEP]", "") == "x" * 25
    assert attention_mask.sum(axis=1).max() <= 10


def test_token_windows_cut_the_separated_stream():
    vocabulary = corpus_vocabulary()
    documents = [Document("m", "a", "hello"), Document("m", "b", "world!")]
    windows = token_windows(documents, vocabulary, 4)
    stream = np.concatenate([vocabulary.encode("hello"), [SEP_ID], vocabulary.encode("world!"), [SEP_ID]])
    assert windows.shape == (2, 5)
    assert (windows.reshape(-1) == stream[:10]).all()


def test_mask_tokens_follows_bert_proportions():
    vocabulary = corpus_vocabulary()
    generator = np.random.default_rng(0)
    input_ids = generator.integers(5, vocabulary.size, size=(200, 64))
    input_ids[:, 0] = CLS_ID
    attention_mask = np.ones_like(input_ids)
    attention_mask[:, 50:] = 0
    input_ids[:, 50:] = PAD_ID
    masked, positions, labels = mask_tokens(input_ids, attention_mask, vocabulary, generator, rate=0.15)
    candidates = (attention_mask == 1) & (input_ids >= 5)
    assert candidates.reshape(-1)[positions].all()
    assert (labels == input_ids.reshape(-1)[positions]).all()
    assert abs(positions.size / candidates.sum() - 0.15) < 0.01
    replaced = masked.reshape(-1)[positions]
    assert abs(np.mean(replaced == MASK_ID) - 0.8) < 0.03
    assert 0.07 < np.mean(replaced == labels) < 0.14  # 10% kept, plus random draws of the same token
    untouched = np.ones(input_ids.size, bool)
    untouched[positions] = False
    assert (masked.reshape(-1)[untouched] == input_ids.reshape(-1)[untouched]).all()
    # a batch too small to draw any position still masks one
    one, position, label = mask_tokens(input_ids[:1, :3], attention_mask[:1, :3], vocabulary,
                                       np.random.default_rng(1), rate=0.01)
    assert position.size == 1 and position[0] in (1, 2)
    with pytest.raises(ValueError, match="no maskable"):
        mask_tokens(np.full((1, 4), PAD_ID), np.zeros((1, 4), np.int64), vocabulary, generator)
