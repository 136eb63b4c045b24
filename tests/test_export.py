"""`raycpt export --dtype`: the written folder loads in transformers in that dtype, is readable by
others (0644), and its logits match the float32 checkpoint's within the dtype's rounding."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from raycpt.checkpoint.export import ExportError, base_dtype, check_logits, export_hf

pytestmark = pytest.mark.slow


def _weights_bytes(folder) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_export_in_a_half_dtype_loads_in_it_with_matching_logits(straight_run, tmp_path, dtype):
    from transformers import AutoModelForCausalLM

    from raycpt.cli import main

    _, run_uri = straight_run
    fp32 = export_hf(run_uri, str(tmp_path / "fp32"), dtype="auto")  # the tiny base is float32
    out = tmp_path / dtype
    old_umask = os.umask(0o077)  # a private umask must not leak into the export's modes
    try:
        assert main(["export", run_uri, "--output", str(out), "--dtype", dtype]) == 0
    finally:
        os.umask(old_umask)
    want = getattr(torch, dtype)
    assert json.loads((out / "config.json").read_text())["dtype"] == dtype
    loaded = AutoModelForCausalLM.from_pretrained(str(out), dtype="auto", local_files_only=True)
    assert {p.dtype for p in loaded.parameters()} == {want}
    assert _weights_bytes(out) < 0.55 * _weights_bytes(fp32)
    for f in out.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
    # The reference: the float32 export (itself checked against the checkpoint at 1e-5).
    x = torch.randint(0, 1000, (2, 16))
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(fp32, local_files_only=True)(input_ids=x).logits
        got = loaded(input_ids=x).logits.float()
    rel = float((got - ref).norm() / ref.norm())
    assert 0 < rel < 0.08, rel  # rounded, yet close


def test_check_logits_refuses_a_folder_that_does_not_match(straight_run, tmp_path):
    _, run_uri = straight_run
    out = export_hf(run_uri, str(tmp_path / "hf"), dtype="bfloat16")
    probe = torch.randint(0, 1000, (1, 8))
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        right = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(input_ids=probe).logits
    assert check_logits(out, probe, right, torch.bfloat16) < 0.02  # bf16 activations only
    with pytest.raises(ExportError, match="differ from the checkpoint's"):
        check_logits(out, probe, right + right.std(), torch.bfloat16)
    with pytest.raises(ExportError, match="loads as torch.bfloat16, not torch.float16"):
        check_logits(out, probe, right, torch.float16)


def test_auto_dtype_reads_the_base_config(tmp_path):
    for key, name, want in (("dtype", "bfloat16", torch.bfloat16), ("torch_dtype", "float16", torch.float16),
                            (None, None, torch.float32)):
        (tmp_path / "config.json").write_text(json.dumps({key: name} if key else {}))
        assert base_dtype(str(tmp_path)) == want
    (tmp_path / "config.json").write_text(json.dumps({"dtype": "int8"}))
    with pytest.raises(ExportError, match="--dtype"):
        base_dtype(str(tmp_path))
