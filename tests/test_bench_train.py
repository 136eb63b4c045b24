"""`raycpt bench train` end to end on CPU: the real path (Ray Train, Ray Data, FSDP2 on gloo,
checkpoint) next to the plain loop, on the tiny shape with random weights and tokens."""

from __future__ import annotations

import json

from raycpt.bench.train import TrainBenchOptions, format_report, resume_timeline, summarize_real


def test_bench_train_tiny_on_cpu_with_a_kill(tmp_path, ray_local, capsys):
    from raycpt.cli import main

    out = tmp_path / "bench.json"
    rc = main(["bench", "train", "--shape", "tiny", "--cpu", "--workers", "1", "--seq-len", "32",
               "--micro-batch-size", "2", "--global-batch-size", "4", "--steps", "6", "--warmup-steps", "1",
               "--kill-at-step", "2", "--baseline", "eager", "--workdir", str(tmp_path / "work"),
               "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "raycpt train (Ray Train)" in printed and "plain loop, eager" in printed
    assert "resume after SIGKILL of rank 0 at step 2" in printed
    r = json.loads(out.read_text())
    real, plain = r["results"]["raycpt"], r["results"]["plain_eager"]
    # The resumed attempt (steps 2..6) is timed without its own first step; the plain loop's 6 steps without one.
    assert real["restarts"] == 1 and real["timed_steps"] == 3 and plain["timed_steps"] == 5
    resume = real["resume_after_kill"]
    assert 0 < resume["worker_start_s"] <= resume["model_ready_s"] <= resume["first_step_s"] < 120
    assert real["tokens_per_s"] > 0 and plain["tokens_per_s"] > 0
    assert 0 < real["final_loss"] < 20
    assert r["ratios_per_device"]["plain_eager"]["all_steps"] > 0
    assert r["job"]["model"]["loss_chunk_tokens"] > 0  # the real path trains through the chunked loss


def test_summary_times_only_the_last_attempt_after_a_restart():
    o = TrainBenchOptions(shape="tiny", workdir="/unused", seq_len=8, micro_batch_size=1, global_batch_size=2,
                          steps=6, warmup_steps=1)
    base = {"data_wait_share": 0.0, "checkpoint_stall_s": 0.0, "loss": 1.0}
    reports = [{**base, "step": 3, "step_times_s": [9.0, 1.0, 1.0], "attempt": 1},
               {**base, "step": 6, "step_times_s": [1.0, 1.0, 1.0], "attempt": 1},
               {**base, "step": 6, "step_times_s": [2.0, 2.0, 2.0], "attempt": 2}]   # restarted at step 3
    s = summarize_real(reports, o, flops_tok=1.0, peak=None)
    # The restarted attempt's first step (step 3: compiling again) is its warm-up.
    assert s["restarts"] == 1 and s["timed_steps"] == 2 and s["step_median_s"] == 2.0
    assert s["tokens_per_s"] == 2 * 8 / 2.0
    assert "tokens/s" in format_report({"options": {**o.__dict__, "baselines": []}, "device": "cpu",
                                        "flops_per_token": 1.0, "results": {"raycpt": s}, "ratios_per_device": {}})


def test_summary_leaves_the_profiled_steps_out():
    import dataclasses

    o = TrainBenchOptions(shape="tiny", workdir="/unused", seq_len=8, micro_batch_size=1, global_batch_size=2,
                          steps=8, warmup_steps=2, profile_steps=(4, 6))
    reports = [{"data_wait_share": 0.0, "checkpoint_stall_s": 0.0, "loss": 1.0, "step": 8, "attempt": 1,
                "step_times_s": [9.0, 9.0, 1.0, 1.0, 3.0, 3.0, 5.0, 1.0]}]  # profiled 4, 5; export in 6
    s = summarize_real(reports, o, flops_tok=1.0, peak=None)
    assert s["timed_steps"] == 3 and s["tokens_per_s"] == 3 * 2 * 8 / 3.0
    assert summarize_real(reports, dataclasses.replace(o, profile_steps=None), 1.0, None)["timed_steps"] == 6


def test_resume_timeline_counts_from_the_last_kill():
    timeline = [{"event": "worker_start", "time": 0.0}, {"event": "first_step", "time": 5.0},
                {"event": "kill", "time": 10.0}, {"event": "worker_start", "time": 14.0},
                {"event": "model_built", "time": 15.0}, {"event": "model_ready", "time": 20.0},
                {"event": "first_step", "time": 31.5}]
    assert resume_timeline(timeline) == {"worker_start_s": 4.0, "model_built_s": 5.0, "model_ready_s": 10.0,
                                         "first_step_s": 21.5}
    assert resume_timeline(timeline[:2]) is None


def test_device_idle_summary_merges_overlapping_kernels():
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from raycpt.train.step import device_idle_summary

    def ev(start, end, device=DeviceType.CUDA):
        return SimpleNamespace(time_range=SimpleNamespace(start=start, end=end), device_type=device)

    # Busy 0-4000 us (two overlapping kernels), idle 4000-5000, busy 5000-6000, idle 6000-6500, busy to 7000.
    events = [ev(0, 3000), ev(1000, 4000), ev(5000, 6000), ev(6500, 7000), ev(0, 9000, DeviceType.CPU)]
    line = device_idle_summary(SimpleNamespace(events=lambda: events), steps=1)
    assert line.startswith("device window 7.0 ms over 1 steps: busy 5.5 ms, idle 1.5 ms (21.4%) in 2 gaps")
    assert "longest: 1.00ms@4ms, 0.50ms@6ms" in line


def test_bad_bench_options_exit_2_naming_the_flag_before_writing_anything(tmp_path, capsys):
    from raycpt.cli import main

    work = tmp_path / "work"
    for bad, flag in ((["--kill-at-step", "9"], "--kill-at-step 9"),
                      (["--kill-at-step", "3", "--checkpoint-every", "2"], "--kill-at-step 3"),
                      (["--global-batch-size", "3"], "--global-batch-size 3")):
        assert main(["bench", "train", "--shape", "tiny", "--cpu", "--steps", "6", "--micro-batch-size", "2",
                     "--workdir", str(work), *bad]) == 2
        assert flag in capsys.readouterr().err
    assert not work.exists()


def test_the_flop_count_leaves_out_the_weight_gradients_of_frozen_parameters():
    from raycpt.train.metrics import flops_per_token

    full = flops_per_token(1000, 2, 8, 16)
    assert full == 6 * 1000 + 12 * 2 * 8 * 16
    assert flops_per_token(1000, 2, 8, 16, n_trainable=1000) == full
    assert flops_per_token(1000, 2, 8, 16, n_trainable=100) == full - 2 * 900  # backward skips 900 weight grads
