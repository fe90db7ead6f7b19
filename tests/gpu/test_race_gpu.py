"""CUDA: ``cggr race``'s timed steps never synchronise the host, and a short race runs end to end on the GPU.

* Every optimizer step of every arm (``standard``, ``cggr``, ``random``, ``standard-aa``, ``cggr-loss``) and the
  on-device token bookkeeping run under ``torch.cuda.set_sync_debug_mode('error')``: a ``.item()``, a
  device-to-host copy or any other synchronising call inside a step raises. The race synchronises once per chunk
  of steps, outside them.
* The training data live on the device, steps run in chunks of several steps, and the budget rule, the ladder
  and the full held-out evaluation work there (a short race, tiny model).
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

pytestmark = pytest.mark.cuda


@pytest.fixture
def tiny_config(tmp_path, monkeypatch):
    import transformers

    monkeypatch.setenv("CGGR_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "config.json"
    transformers.LlamaConfig(
        vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256,
    ).to_json_file(path)
    return path


@pytest.mark.parametrize("head", ["fused", "logits"])
def test_race_steps_never_sync_the_host_and_the_race_runs_on_cuda(tiny_config, tmp_path, monkeypatch, head):
    from cggr.cli import race

    real_step, real_counts = race.Arm.step, race.Arm.device_counts
    steps = []

    def strict(fn):
        def wrapped(self, *args, **kwargs):
            torch.cuda.set_sync_debug_mode("error")
            try:
                return fn(self, *args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")

        return wrapped

    def step(self, *args, **kwargs):
        steps.append(self.arm)
        return strict(real_step)(self, *args, **kwargs)

    monkeypatch.setattr(race.Arm, "step", step)
    monkeypatch.setattr(race.Arm, "device_counts", strict(real_counts))
    cfg = race.RaceConfig(model=str(tiny_config), data="code", minutes=0.05, router_layers=1, batch_size=4,
                          seq_len=64, evals=2, eval_sequences=8, heldout_blocks=64, out=str(tmp_path / "out"),
                          progress=False, device="cuda", head=head, ladder=(0.5,),
                          # every registered arm but the reducible ones (they need --reference: a reference model
                          # trained first; tests/cli/test_cli_race_selection.py covers them on the CPU)
                          arms=tuple(a for a in race.ARMS if race.ARM_SPECS[a].scoring != "reducible"))
    payload = race.run_race(cfg, log=lambda *_: None)
    assert len(steps) > 10 * len(cfg.arms)
    s = payload["settings"]
    assert s["precision"] == "bf16 autocast" and s["head"] == head
    for a in payload["arms"]:
        assert a["steps"] >= 5, a["arm"]
        assert math.isfinite(a["heldout_loss"]) and a["heldout_se"] > 0
        assert a["train_seconds"] <= 3.0 + a["max_step_seconds"]
        assert a["ladder"] and a["ladder"][0]["decay_steps"] >= 1
        per_step = s["scanned_per_step"] if race.ARM_SPECS[a["arm"]].scans else s["batch_size"]
        assert a["tokens_scanned"] == a["steps"] * per_step * 63
        if a["arm"] in ("cggr", "random"):
            assert a["tokens_backpropagated"] == a["steps"] * s["trained_per_step"] * 63
