"""The non-finite guard on 2 gloo ranks: a NaN seen by one rank only makes every rank drop the
update (or stop), as one rank would; a clean update then applies on both."""
import torch

from tests.distributed.workers import guard_agreement
from tests.helpers import spawn


def test_a_nan_on_one_rank_drops_the_update_on_every_rank(tmp_path):
    out = tmp_path / "guard.pt"
    spawn(guard_agreement, 2, str(out))
    ranks = torch.load(out, weights_only=False)
    for r in ranks:
        assert r["skip"] == (False, ["batch"]) and r["unchanged"]
        assert r["clean"] == (True, [])
        assert "non-finite batch in the fake_score update" in r["stop"]
