"""`training.seed` varies what a student is trained on: which records a declared `subsample` draws (besides the
random init of from_config students and the data order, tested in test_students / test_training_resume)."""

from __future__ import annotations

from kd.config.students import Training
from kd.distill.envelope import subsample

RECORDS = [{"id": f"{i:064x}"} for i in range(40)]


def test_subsample_is_drawn_by_seed() -> None:
    # regression (issue 20): "3 seeds" varied only the data order; the records trained on never changed
    draws = [subsample(RECORDS, Training(subsample=10, seed=s)) for s in range(3)]
    assert all(len(d) == 10 for d in draws)
    assert len({tuple(r["id"] for r in d) for d in draws}) == 3  # each seed its own sample
    assert draws[0] == subsample(RECORDS, Training(subsample=10, seed=0))  # same seed, same sample
    assert all([r for r in RECORDS if r in d] == d for d in draws)  # in the datasets' order
    assert subsample(RECORDS, Training(seed=1)) == RECORDS == subsample(RECORDS, Training(subsample=40, seed=1))
    # one record's draw does not depend on the others: new records leave most of a sample in place
    grown = subsample([*RECORDS, *({"id": f"{i:064x}"} for i in range(40, 44))], Training(subsample=10, seed=0))
    assert len({r["id"] for r in grown} & {r["id"] for r in draws[0]}) >= 7
