"""``cggr race`` arms of issue 15: cggr-sampled, cggr-importance and the reducible arms with ``--reference``."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from cggr.cli import race  # noqa: E402
from cggr.cli.main import main  # noqa: E402
from cggr.cli.presets import CLIError  # noqa: E402
from cggr.cli.race import ARM_SPECS, RaceConfig, run_race  # noqa: E402
from tests import fake_clock  # noqa: E402

NEW_ARMS = ("cggr-sampled", "cggr-importance", "cggr-reducible", "cggr-reducible-sampled", "cggr-reducible-self")


pytestmark = pytest.mark.usefixtures("race_cache")  # tests/cli/conftest.py: a cache of its own


def test_new_arms_are_registered_and_named_in_help(capsys):
    for arm in NEW_ARMS:
        spec = ARM_SPECS[arm]
        assert spec.kind == "model" and spec.router and spec.scans and spec.description
    assert ARM_SPECS["cggr-importance"].selection == "importance"
    assert dict(ARM_SPECS["cggr-reducible"].options)["reference_norm"] == "zscore"
    with pytest.raises(SystemExit):
        main(["race", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for arm in NEW_ARMS:
        assert arm in text
    assert "--reference" in text


def test_reducible_arms_need_reference():
    with pytest.raises(CLIError, match="cggr-reducible need --reference"):
        race.validate_config(RaceConfig(arms=("standard", "cggr-reducible")))
    with pytest.raises(CLIError, match="--reference-fraction must be in"):
        race.validate_config(RaceConfig(reference=True, reference_fraction=1.0))


def test_race_with_reference_trains_every_arm_on_the_other_blocks(small_config, corpus, tmp_path, monkeypatch):
    """The reference trains on a seeded split; every arm trains only on the other blocks; the reducible arm's
    CGGRModel receives, for each scanned batch, the reference losses of exactly those blocks; the one-off cost is in
    the settings and on its own line of the report."""
    from cggr.cli.race import run as race_run

    built = {}
    real_build = race_run._build_reference

    def build(cfg, spec, data, *args, **kwargs):
        new, table, info = real_build(cfg, spec, data, *args, **kwargs)
        built.update(full=data.train_ids.clone(), train=new.train_ids.clone(), table=table.clone(), info=info)
        return new, table, info

    monkeypatch.setattr(race_run, "_build_reference", build)
    from cggr import model as cggr_model

    seen = []
    real_forward = cggr_model.CGGRModel.forward

    def forward(self, input_ids=None, labels=None, attention_mask=None, reference_loss=None, **kw):
        if reference_loss is not None:
            seen.append((input_ids.detach().clone(), reference_loss.detach().clone()))
        return real_forward(self, input_ids, labels, attention_mask, reference_loss=reference_loss, **kw)

    monkeypatch.setattr(cggr_model.CGGRModel, "forward", forward)
    cfg = RaceConfig(model=str(small_config), data=corpus, minutes=0.01, router_layers=1, batch_size=2, seq_len=32,
                     evals=1, eval_sequences=4, heldout_blocks=8, out=str(tmp_path), progress=False, device="cpu",
                     arms=("standard", "random", *NEW_ARMS), ladder=(), reference=True, reference_steps=3,
                     reference_fraction=0.4, reference_blocks=40)
    clock = fake_clock.install(monkeypatch, [0.05])  # 12 steps of 0.6 s per arm, whatever the machine's load
    payload = run_race(cfg, log=lambda *_: None, clock=clock)
    info = payload["settings"]["reference"]
    n_all, n_train = built["full"].shape[0], built["train"].shape[0]
    assert n_train == 40 == info["train_blocks"] and info["unused_blocks"] == n_all - n_train - info["reference_blocks"]
    assert info["reference_blocks"] == round(0.4 * n_all) and info["steps"] == 3
    assert payload["settings"]["data_info"]["train_sequences"] == 40
    assert info["total_seconds"] >= info["train_seconds"] >= 0
    # every arm read only the blocks the reference never trained on
    for a in payload["arms"]:
        assert max(a["first_sequences"]) < n_train, a["arm"]
        assert a["steps"] >= 1
    # each reducible batch got the reference losses of its own blocks
    assert seen
    rows_of = {tuple(r.tolist()): i for i, r in enumerate(built["train"])}
    for ids, ref in seen:
        rows = [rows_of[tuple(r.tolist())] for r in ids]
        assert torch.equal(ref, built["table"][rows].float())
    text = (tmp_path / "race.md").read_text()
    assert "Reference model (`--reference`, for the reducible arms)" in text and "no arm's clock" in text
    assert "further training blocks unused" in text


def test_importance_arm_loss_is_weighted(small_config, corpus, tmp_path, monkeypatch):
    """The importance arm trains through CGGRModel(selection='importance') (its metrics carry the variance ratio)."""
    made = []
    real_init = race.Arm.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(race.Arm, "__init__", init)
    cfg = RaceConfig(model=str(small_config), data=corpus, minutes=0.004, router_layers=1, batch_size=2, seq_len=32,
                     evals=1, eval_sequences=4, heldout_blocks=8, out=str(tmp_path), progress=False, device="cpu",
                     arms=("cggr-importance", "cggr-sampled"), ladder=())
    run_race(cfg, log=lambda *_: None, clock=fake_clock.install(monkeypatch, [0.05]))  # 4 steps of 0.24 s
    imp = [a for a in made if a.arm == "cggr-importance"][-1].wrapper
    assert imp.selection == "importance" and imp.scoring == "loss"
    assert imp.get_metrics()["importance_variance_ratio"] > 0
    smp = [a for a in made if a.arm == "cggr-sampled"][-1].wrapper
    assert smp.selection == "sampled" and smp.temperature == race.SAMPLED_TEMPERATURE


def test_reducible_self_arm_scans_2b_and_trains_on_the_brute_force_top_b():
    """cggr-reducible-self: the learner itself scores 2B sequences (free lunch: it reads 2B whatever --ratio) and its
    loss is the fp64 mean cross-entropy of the B with the largest z(model loss) − z(reference loss)."""
    spec = ARM_SPECS["cggr-reducible-self"]
    assert spec.router == "model" and spec.scoring == "reducible" and spec.scan_factor == 2.0
    cfg = RaceConfig(ratio=0.25, head="logits", reference=True)
    assert race.arm_scan(spec, cfg, 3, 12) == (6, 0.5)
    assert race.arm_scan(ARM_SPECS["random"], cfg, 3, 12) == (12, 0.25)
    assert race.arm_scan(ARM_SPECS["standard"], cfg, 3, 12) == (3, 0.25)
    # the equal-scan protocol and an explicit --scan-multiplier keep the race's S for every arm
    assert race.arm_scan(spec, RaceConfig(ratio=0.25, protocol="equal-scan"), 3, 3) == (3, 0.25)
    assert race.arm_scan(spec, RaceConfig(ratio=0.25, scan_multiplier=3.0), 3, 9) == (9, 0.25)
    with pytest.raises(ValueError, match="scan_factor must be a number >= 1"):
        race.register_arm(race.ArmSpec("bad-scan", "model", scans=True, scan_factor=0.5))
    with pytest.raises(ValueError, match="router must be True, False or 'model'"):
        race.register_arm(race.ArmSpec("bad-router", "model", router="router"))

    torch.manual_seed(11)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64))
    b, t = 3, 17
    per_step, ratio = race.arm_scan(spec, cfg, b, 4 * b)
    ids = torch.randint(0, 97, (per_step, t))
    mask = torch.ones_like(ids, dtype=torch.bool)
    reference = torch.rand(10, dtype=torch.float64) * 3 + 2  # (N_train,) a table; this batch is rows 4..9
    rows = torch.arange(4, 10)
    arm = race.Arm("cggr-reducible-self", model, cfg, 1, 0.0, torch.device("cpu"), fused_head=False, seed=0,
                   reference=reference.float(), ratio=ratio)
    assert arm.wrapper.router is model
    loss = arm.loss(ids, mask, ids.clone(), rows)

    with torch.no_grad():  # fp64 brute force
        ref_model = transformers.LlamaForCausalLM(model.config).double()
        ref_model.load_state_dict(model.state_dict())
        logits = ref_model(input_ids=ids).logits[:, :-1]  # (2B, T-1, V)
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # (2B, T-1)
        seq = nll.mean(-1)

        def z(x):
            return (x - x.mean()) / x.std()

        score = z(seq) - z(reference[rows])
        top = torch.topk(score, b).indices
        expected = nll[top].mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)
