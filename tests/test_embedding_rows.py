"""Embedding tables served from the rows a forward reads: same values as the full table, a fraction of its memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from ecoquant.calibrate.capture import lazy_outside
from ecoquant.calibrate.lazy import CheckpointReader, Materializer
from ecoquant.errors import EcoquantError
from ecoquant.export.safetensors_stream import read_rows, read_tensor


class _Model(nn.Module):
    """An embedding (with a pad row read directly, as Gemma-4's image-text forward does) and a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(1000, 16, padding_idx=3)
        self.proj = nn.Linear(16, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.embed(ids)) + self.embed.weight[3].sum()


@pytest.fixture
def stored(tmp_path: Path) -> tuple[Path, _Model]:
    torch.manual_seed(0)
    full = _Model().to(torch.bfloat16)
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, tmp_path / "model.safetensors")
    return tmp_path, full


def test_read_rows_matches_slicing_the_whole_tensor(stored: tuple[Path, _Model]) -> None:
    path, _ = stored
    info = CheckpointReader(path).info("embed.weight")
    assert info is not None
    whole = read_tensor(info)
    rows = torch.tensor([0, 1, 2, 7, 500, 501, 999])  # runs of neighbours and single rows, both ends
    got = read_rows(info, rows)
    assert got.dtype == torch.bfloat16 and torch.equal(got, whole[rows])
    assert read_rows(info, torch.empty(0, dtype=torch.long)).shape == (0, 16)
    with pytest.raises(EcoquantError, match="token id 1000 is outside embed.weight"):
        read_rows(info, torch.tensor([5, 1000]))


def test_a_lazily_built_model_gives_the_full_tables_outputs_from_a_few_rows(stored: tuple[Path, _Model]) -> None:
    path, full = stored
    with torch.device("meta"):
        lazy = _Model()
    mat = Materializer(lazy, CheckpointReader(path), torch.device("cpu"), torch.float32)
    reference = full.float()
    calls = [torch.tensor([[5, 9, 9, 400]]), torch.tensor([[9, 12, 998]])]  # the second call needs new rows
    with lazy_outside(lazy, nn.ModuleList(), mat.before_call), torch.no_grad():
        for ids in calls:
            assert torch.equal(lazy(ids), reference(ids))
    table = mat.tables[id(lazy.embed)]
    # rows 0 .. padding_idx stay in place (weight[3] is read directly), then the ids the calls used
    assert table.ids.tolist() == [0, 1, 2, 3, 5, 9, 12, 400, 998]
    assert lazy.embed.weight.shape == (9, 16) and lazy.embed.weight.dtype == torch.float32
    mat.release(lazy)
    assert not mat.tables and lazy.embed.weight.device.type == "meta"
