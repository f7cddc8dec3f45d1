"""Tensor parallelism in the worker: a fused q/k/v piece's place in the whole tensor, what TP
does not run with yet refused before launch, and real runs through `sdtrain launch` against
the one-process run of the same recipe."""

from __future__ import annotations

import pytest
import torch

from conftest import sdtrain
from sdtrain.parallel.placement import AxisShard, Placement
from sdtrain.parallel.tensor_parallel import tp_piece

# --- a rank's piece of a fused q/k/v, as boxes of the whole tensor --------------------------


def test_a_box_of_a_qkv_piece_splits_into_one_box_per_part_of_the_whole():
    whole = torch.arange(12 * 2).view(12, 2)  # q, k, v of 4 rows each, cut over 2 ranks
    for rank in range(2):
        shard = AxisShard("tp", 0, 12, 2 * rank, pieces=3, part=2)
        placement = Placement(shards=(shard,))
        piece = tp_piece(whole, shard, 2)  # rows [q 2r:2r+2, k ..., v ...]
        assert placement.whole_offset((3, 1)) == (4 + 2 * rank + 1, 1)  # k's second row of this rank
        boxes = placement.whole_boxes((1, 0), (4, 2))  # piece rows 1..4: q's last, k's two, v's first
        assert [(at, size) for at, _, size in boxes] == [
            ((2 * rank + 1, 0), (1, 2)), ((4 + 2 * rank, 0), (2, 2)), ((8 + 2 * rank, 0), (1, 2))]
        box = piece[1:5]
        for at, inner, size in boxes:
            got = box[tuple(slice(i, i + n) for i, n in zip(inner, size))]
            assert torch.equal(got, whole[tuple(slice(a, a + n) for a, n in zip(at, size))])


def test_a_box_of_a_piece_cut_once_is_one_box():
    placement = Placement(shards=(AxisShard("tp", 1, 8, 4),))
    assert placement.whole_boxes((0, 1), (3, 2)) == [((0, 5), (0, 0), (3, 2))]


# --- what TP does not run with yet: exit 2 before anything starts ----------------------------


@pytest.mark.parametrize("overrides, expected", [
    (["parallel.pipeline.stages=2"], "parallel.tensor_parallel with parallel.pipeline.stages 2 is not supported yet"),
    (["train.precision=fp16"], "parallel.tensor_parallel with train.precision fp16"),
])
def test_what_tp_does_not_run_with_yet_exits_2(write_recipe, tmp_path, overrides, expected):
    args = ["launch", write_recipe(), "--run-dir", tmp_path / "run", "--nproc-per-node", 4,
            "--set", "parallel.tensor_parallel=2"]
    for override in overrides:
        args += ["--set", override]
    result = sdtrain(*args)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert not (tmp_path / "run").exists()
