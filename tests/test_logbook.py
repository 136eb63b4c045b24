"""The run's metrics record: a resumed run drops the steps after its checkpoint, once."""

from __future__ import annotations

from raycpt.train.logbook import MetricsLog, read_train_log


def report(step: int, loss: float) -> dict:
    return {"step": step, "max_steps": 6, "loss": loss, "lr": 1e-4, "grad_norm": 1.0, "tokens_per_s": 10.0,
            "mfu": None, "data_wait_share": 0.0, "checkpoint_stall_s": 0.0, "eta_s": 1.0, "tokens/new": 64 * step}


def test_resume_drops_records_after_the_checkpoint_and_rank_1_writes_nothing(tmp_path):
    run = str(tmp_path / "run")
    first = MetricsLog(run, "run", 0, rank=0)
    for step in (1, 2, 3, 4):
        first.train(report(step, 10.0 - step))
    first.eval({"step": 4, "loss": {"new": 2.0, "old": 3.0}, "forgetting": {"old": 0.1}})
    first.close()  # died after step 4; its last checkpoint was step 2
    MetricsLog(run, "run", 2, rank=1).train(report(3, 0.0))  # other ranks: no-ops
    second = MetricsLog(run, "run", 2, rank=0)
    assert [r["step"] for r in read_train_log(run)] == [1, 2]
    second.train(report(3, 5.5))
    second.close()
    records = read_train_log(run)
    assert [r["step"] for r in records] == [1, 2, 3] and records[-1]["loss"] == 5.5
    assert "mfu" not in records[-1]  # None fields are left out
    assert len(list((tmp_path / "run" / "metrics" / "tb").glob("events.out.tfevents.*"))) == 2
