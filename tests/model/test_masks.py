import torch

from interleaf.model.masks import IGNORE_INDEX, cross_attention_mask, flamingo_labels, media_index, position_ids

IMG, EOC, EOS, PAD = 9, 8, 2, 0


def test_media_index_counts_images_at_or_before():
    ids = torch.tensor([[5, IMG, 5, 5, IMG, 5]])
    assert media_index(ids, IMG).tolist() == [[0, 1, 1, 1, 2, 2]]


def test_mask_last_image_only():
    ids = torch.tensor([[5, IMG, 5, IMG, 5]])
    mask = cross_attention_mask(ids, IMG, 2, mode="last")
    assert mask.int().tolist() == [[[0, 0], [1, 0], [1, 0], [0, 1], [0, 1]]]


def test_mask_all_previous_images():
    ids = torch.tensor([[5, IMG, 5, IMG, 5]])
    mask = cross_attention_mask(ids, IMG, 2, mode="all")
    assert mask.int().tolist() == [[[0, 0], [1, 0], [1, 0], [1, 1], [1, 1]]]


def test_mask_eos_resets_for_packed_documents():
    # doc 1: <image> a EOS | doc 2: b <image> c   (EOS still sees its own image, as in IDEFICS)
    ids = torch.tensor([[IMG, 5, EOS, 6, IMG, 7]])
    last = cross_attention_mask(ids, IMG, 2, mode="last", eos_token_id=EOS)
    assert last.int().tolist() == [[[1, 0], [1, 0], [1, 0], [0, 0], [0, 1], [0, 1]]]
    every = cross_attention_mask(ids, IMG, 2, mode="all", eos_token_id=EOS)
    assert every.int().tolist() == last.int().tolist()  # the earlier document's image stays out of reach
    without_reset = cross_attention_mask(ids, IMG, 2, mode="all")
    assert without_reset[0, 3].tolist() == [True, False] and without_reset[0, 5].tolist() == [True, True]


def test_mask_unused_media_slots_are_never_visible():
    ids = torch.tensor([[IMG, 5, 5]])
    mask = cross_attention_mask(ids, IMG, 3, mode="all")
    assert not mask[..., 1:].any()


def test_position_ids_skip_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_flamingo_labels_mask_what_is_not_learned():
    #           pad  text IMG  a   b  EOC  c   d  IMG  e
    ids = torch.tensor([[PAD, 5, IMG, 6, 7, EOC, 3, 4, IMG, 1]])
    attn = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1, 1, 1]])
    labels = flamingo_labels(ids, attn, image_token_id=IMG, end_of_chunk_id=EOC)
    x = IGNORE_INDEX
    assert labels.tolist() == [[x, x, x, 6, 7, EOC, x, x, x, 1]]


def test_padding_that_shares_the_eos_id_ends_no_document():
    # right padding with pad == EOS, then a generated token: it still sees the prompt's image
    ids = torch.tensor([[IMG, 5, 6, 7], [IMG, 5, EOS, 7]])
    attention = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 1]])
    mask = cross_attention_mask(ids, IMG, 1, mode="last", eos_token_id=EOS, attention_mask=attention)
    assert mask[:, -1, 0].tolist() == [True, True]
    real_eos = cross_attention_mask(ids, IMG, 1, mode="last", eos_token_id=EOS)
    assert real_eos[1, -1, 0].item() is False  # without the mask, the same id is a real EOS
