"""The one padding function: ids and embeddings, right for the LLM, left for the distiller."""
import torch

from mendctl.models.padding import pad


def test_right_padding_keeps_rows_at_the_start():
    ids, mask = pad([torch.tensor([5, 6, 7]), torch.tensor([8])], value=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_left_padding_ends_every_row_at_the_last_position():
    ids, mask = pad([torch.tensor([5, 6, 7]), torch.tensor([8]), torch.tensor([], dtype=torch.long)], 1, left=True)
    assert ids.tolist() == [[5, 6, 7], [1, 1, 8], [1, 1, 1]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]


def test_embedding_rows_pad_with_zero_vectors_in_their_dtype():
    rows = [torch.ones(2, 3, dtype=torch.float16), torch.full((1, 3), 2.0, dtype=torch.float16)]
    out, mask = pad(rows)
    assert out.shape == (2, 2, 3) and out.dtype == torch.float16
    assert out[1, 1].tolist() == [0, 0, 0] and out[1, 0].tolist() == [2, 2, 2] and mask.tolist() == [[1, 1], [1, 0]]
