"""The dp x sp layout: rank order and the configurations that cannot work."""
import pytest

from megadmd.config import ConfigError
from megadmd.parallel.state import check_layout, layout_groups


def test_dp_is_inferred_from_the_world_size():
    assert check_layout(8, 2) == 4
    assert check_layout(8, 1) == 8
    assert check_layout(4, 4, num_heads=12) == 1


def test_world_size_must_divide_by_sp():
    with pytest.raises(ConfigError, match="world size 6 is not divisible by parallel.sp_size=4"):
        check_layout(6, 4)


def test_heads_must_divide_by_sp():
    # Wan2.1-1.3B has 12 heads: sp 8 cannot split them
    with pytest.raises(ConfigError, match="12 attention heads do not divide by parallel.sp_size=8"):
        check_layout(8, 8, num_heads=12)


def test_sp_groups_are_consecutive_ranks():
    sp_groups, dp_groups = layout_groups(8, 2)
    assert sp_groups == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert dp_groups == [[0, 2, 4, 6], [1, 3, 5, 7]]
    sp_groups, dp_groups = layout_groups(4, 4)
    assert sp_groups == [[0, 1, 2, 3]] and dp_groups == [[0], [1], [2], [3]]
