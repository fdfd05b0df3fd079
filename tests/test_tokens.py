from pathlib import Path

import pytest
from tokenizers import processors
from transformers import PreTrainedTokenizerFast

from pipeline.core.random_models import local_bpe_tokenizer
from pipeline.core.tokens import (
    SubjectNotFoundError,
    encode,
    fill,
    right_pad,
    subject_span,
    target_ids,
)
from tests.conftest import CACHE

# (prompt, subject, decoded span text): leading space, start of prompt, twice (last occurrence
# before the answer), a subject whose tokens differ from the bare subject's, punctuation after.
CASES = [
    ("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", " Danielle Darrieux"),
    ("Danielle Darrieux's mother tongue is", "Danielle Darrieux", "Danielle Darrieux"),
    ("Paris is the capital; Paris is in", "Paris", " Paris"),
    ("iPhone, developed by", "iPhone", "iPhone"),
    ("The headquarters of Apple Inc. are in", "Apple Inc.", " Apple Inc."),
]


@pytest.fixture(scope="module")
def gpt2_bpe():
    return local_bpe_tokenizer(CACHE)


def _check_cases(tokenizer):
    for prompt, subject, expected in CASES:
        start, end = subject_span(tokenizer, prompt, subject)
        ids = encode(tokenizer, prompt)
        assert tokenizer.decode(ids[start:end]) == expected, (prompt, subject)
        assert 0 <= start < end <= len(ids)


def test_subject_span_gpt2_bpe(gpt2_bpe):
    _check_cases(gpt2_bpe)
    # The bare subject starts "D..." but inside the sentence it is "ĠD...": spans use offsets.
    assert gpt2_bpe.tokenize("Danielle")[0] != gpt2_bpe.tokenize(" Danielle")[0]


@pytest.mark.slow
def test_subject_span_smollm2(smollm2):
    _check_cases(smollm2.tokenizer)
    start, end = subject_span(smollm2.tokenizer, CASES[0][0], CASES[0][1])
    assert (start, end) == (4, 9)  # The mother tongue of | ĠDaniel le ĠDar rie ux | is


def test_subject_span_last_occurrence(gpt2_bpe):
    prompt = "Paris is the capital; Paris is in"
    start, _ = subject_span(gpt2_bpe, prompt, "Paris")
    assert start > 0


def test_subject_span_with_bos(gpt2_bpe):
    with_bos = PreTrainedTokenizerFast(tokenizer_object=gpt2_bpe.backend_tokenizer)
    with_bos.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)]
    )
    prompt, subject = "Danielle Darrieux's mother tongue is", "Danielle Darrieux"
    ids = encode(with_bos, prompt)
    assert ids[0] == 0
    start, end = subject_span(with_bos, prompt, subject)
    plain_start, plain_end = subject_span(gpt2_bpe, prompt, subject)
    assert (start, end) == (plain_start + 1, plain_end + 1)


def test_subject_not_found(gpt2_bpe):
    with pytest.raises(SubjectNotFoundError, match="not found"):
        subject_span(gpt2_bpe, "The capital of France is", "Germany")


def test_target_ids_leading_space(gpt2_bpe):
    ids = target_ids(gpt2_bpe, "Danielle Darrieux")
    assert gpt2_bpe.decode(ids) == " Danielle Darrieux"
    assert len(ids) > 1
    assert target_ids(gpt2_bpe, " English ") == target_ids(gpt2_bpe, "English")
    in_context = target_ids(gpt2_bpe, "English", "The mother tongue of X is")
    assert gpt2_bpe.decode(in_context) == " English"
    with pytest.raises(ValueError, match="empty"):
        target_ids(gpt2_bpe, "  ")


def test_fill_and_pad():
    assert fill("{} is in", "Paris") == "Paris is in"
    with pytest.raises(ValueError):
        fill("no placeholder", "Paris")
    ids, mask = right_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_tokenizer_is_deterministic(tmp_path: Path):
    a = local_bpe_tokenizer(tmp_path / "a")
    b = local_bpe_tokenizer(tmp_path / "b")
    assert a.get_vocab() == b.get_vocab()
