"""``cggr race`` end to end with a few-second budget on every data source (CPU, small model)."""

from __future__ import annotations

import json
import math
import re

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from cggr.cli.data import load_text_data  # noqa: E402
from cggr.cli.main import main  # noqa: E402
from cggr.cli.race import ARM_SPECS, ARMS, DEFAULT_ARMS, RaceConfig, run_race  # noqa: E402
from tests import fake_clock  # noqa: E402

pytestmark = pytest.mark.usefixtures("race_cache")  # tests/cli/conftest.py: a cache of its own


def _check_race(payload, *, with_accuracy: bool):
    arms = payload["arms"]
    assert [a["arm"] for a in arms] == list(DEFAULT_ARMS)
    # the same initial weights and the same initial held-out loss in every arm
    assert len({a["init_digest"] for a in arms}) == 1
    assert len({a["curve"][0]["heldout_loss"] for a in arms}) == 1
    # the same data order: every arm but the A/A one reads a prefix of the same sequence stream
    firsts = [a["first_sequences"] for a in arms if a["arm"] != "standard-aa"]
    n = min(map(len, firsts))
    assert n >= 2 and all(f[:n] == firsts[0][:n] for f in firsts)
    s = payload["settings"]
    for a in arms:
        assert a["steps"] >= 1
        assert all(math.isfinite(p["heldout_loss"]) for p in a["curve"])
        assert a["curve"][-1]["fraction"] == 1.0 and len(a["curve"]) == s["evals"] + 1
        # the stop rule (tested exactly with a fake clock below): on a real clock a step can only overrun by how
        # much it was slower than the arm's recent steps
        assert a["train_seconds"] <= s["minutes_per_arm"] * 60 + a["max_step_seconds"]
        per_step = s["scanned_per_step"] if ARM_SPECS[a["arm"]].scans else s["batch_size"]
        assert a["sequences_scanned"] == a["steps"] * per_step
        if a["arm"] in ("cggr", "random"):  # they back-propagate the selected share of sequences only
            assert a["tokens_backpropagated"] < a["tokens_scanned"]
        else:
            assert a["tokens_backpropagated"] == a["tokens_scanned"]
        assert (a["router_tokens"] > 0) == (a["arm"] == "cggr")
        if with_accuracy:
            assert all(0.0 <= p["accuracy"] <= 1.0 for p in a["curve"])
    for suffix in ("json", "md", "png"):
        assert payload["paths"][suffix].endswith(suffix)
    with open(payload["paths"]["json"], encoding="utf-8") as f:
        stored = json.load(f)
    assert stored["settings"]["ratio"] == s["ratio"] and len(stored["arms"]) == len(arms)


def test_race_on_code_corpus(small_config, tmp_path):
    cfg = RaceConfig(model=str(small_config), data="code", minutes=0.015, router_layers=1, batch_size=2, seq_len=32,
                     evals=2, eval_sequences=8, out=str(tmp_path), progress=False)
    payload = run_race(cfg, log=lambda *_: None)
    _check_race(payload, with_accuracy=False)
    assert payload["settings"]["scanned_per_step"] == 8  # 1 / ratio × the standard batch
    data = load_text_data("code", seq_len=32, vocab_size=384, eval_sequences=8)
    assert set(data.train_keys).isdisjoint(data.heldout_keys)
    assert len(re.findall(r"\n\| standard +\| +1 \|", (tmp_path / "race.md").read_text())) == 1
    # --head auto on a CPU: every arm on the model's logits, as CGGRModel's own default there
    assert payload["settings"]["head"] == "logits" and payload["settings"]["head_option"] == "auto"
    assert "the model's logits" in (tmp_path / "race.md").read_text()


def test_race_on_arithmetic(small_config, tmp_path):
    cfg = RaceConfig(model=str(small_config), data="arithmetic", minutes=0.015, router_layers=1, batch_size=4,
                     evals=1, eval_sequences=6, heldout_blocks=12, out=str(tmp_path), progress=False,
                     protocol="equal-scan", train_problems=3000)
    payload = run_race(cfg, log=lambda *_: None)
    _check_race(payload, with_accuracy=True)
    assert payload["settings"]["scanned_per_step"] == 4  # equal scan: every arm reads B per step
    assert payload["settings"]["trained_per_step"] == 1 and payload["settings"]["protocol"] == "equal-scan"
    assert payload["settings"]["heldout_blocks"] == 12 and payload["settings"]["probe_blocks"] == 6


def test_race_on_a_jsonl_path_through_the_command_line(small_config, tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    lines = [json.dumps({"text": f"def f{i}(x):\n    return x * {i} + {i % 7}\n" * 6}) for i in range(200)]
    corpus.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    code = main(["race", "--model", str(small_config), "--data", str(corpus), "--minutes", "0.01",
                 "--router-layers", "1", "--batch-size", "2", "--seq-len", "32", "--evals", "1",
                 "--eval-sequences", "4", "--out", str(out), "--no-progress", "--arms", "standard,cggr,random"])
    assert code == 0
    payload = json.loads((out / "race.json").read_text())
    assert [a["arm"] for a in payload["arms"]] == ["standard", "cggr", "random"]
    assert all(math.isfinite(a["heldout_loss"]) for a in payload["arms"])
    assert len({a["init_digest"] for a in payload["arms"]}) == 1
    assert "held-out loss" in capsys.readouterr().out


def test_race_with_a_local_pretrained_model_folder(tmp_path):
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    from cggr.cli.data import EOS, train_bpe

    texts = [f"def g{i}(y):\n    return y - {i}\n" * 4 for i in range(300)]
    tok = PreTrainedTokenizerFast(tokenizer_object=train_bpe(texts, 300), eos_token=EOS)
    folder = tmp_path / "pretrained"
    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, text in enumerate(texts[:60]):
        (corpus / f"m{i}.py").write_text(text)
    cfg = RaceConfig(model=str(folder), data=str(corpus), minutes=0.005, router_layers=1, batch_size=2, seq_len=16,
                     evals=1, eval_sequences=4, out=str(tmp_path / "out"), progress=False,
                     arms=("standard", "cggr"))
    payload = run_race(cfg, log=lambda *_: None)
    assert payload["settings"]["model_kind"] == "pretrained"
    assert payload["settings"]["data_info"]["tokenizer"] == "hf"
    # the pretrained weights are the starting point of every arm
    assert payload["arms"][0]["init_digest"] == payload["arms"][1]["init_digest"]
    from cggr.cli.race import weights_digest

    assert payload["arms"][0]["init_digest"] == weights_digest(LlamaForCausalLM.from_pretrained(folder))
    assert all(math.isfinite(a["heldout_loss"]) for a in payload["arms"])


def test_a_race_split_by_seed_and_by_arm_merges_into_one_report_with_intervals(small_config, tmp_path, capsys):
    """Device calls are limited in time: a race run as (seed 0: two arms), (seed 0: two other arms), (seed 1: all)
    merges into one payload whose summary pairs the arms by seed; repeats and mismatches are refused."""
    from cggr.cli.stats import paired_interval

    common = ["--model", str(small_config), "--data", "code", "--minutes", "0.005", "--router-layers", "1",
              "--batch-size", "2", "--seq-len", "32", "--evals", "1", "--eval-sequences", "4", "--heldout-blocks",
              "8", "--no-progress", "--ladder", "none"]
    assert main(["race", *common, "--arms", "cggr,standard", "--out", str(tmp_path / "a")]) == 0
    assert main(["race", *common, "--arms", "random,standard-aa", "--out", str(tmp_path / "b")]) == 0
    assert main(["race", *common, "--seed", "1", "--arms", "standard,cggr,random,standard-aa", "--out",
                 str(tmp_path / "c")]) == 0
    files = [str(tmp_path / x / "race.json") for x in "abc"]
    assert main(["race", "--merge", *files, "--out", str(tmp_path / "m")]) == 0
    merged = json.loads((tmp_path / "m" / "race.json").read_text())
    assert [(a["arm"], a["seed"]) for a in merged["arms"]] == [
        ("standard", 0), ("cggr", 0), ("random", 0), ("standard-aa", 0),
        ("standard", 1), ("cggr", 1), ("random", 1), ("standard-aa", 1)]
    assert [a["run"] for a in merged["arms"]] == [1, 1, 2, 2, 3, 3, 3, 3]
    assert (tmp_path / "m" / "race.png").is_file()
    loss = {(a["arm"], a["seed"]): a["heldout_loss"] for a in merged["arms"]}
    summary = {e["arm"]: e for e in merged["summary"]["arms"]}
    for arm in ("cggr", "random", "standard-aa"):
        ref = paired_interval([loss[(arm, 0)], loss[(arm, 1)]], [loss[("standard", 0)], loss[("standard", 1)]])
        got = summary[arm]["vs_standard"]
        assert got["mean"] == pytest.approx(ref.mean) and got["low"] == pytest.approx(ref.low)
        assert got["tie"] == (ref.low <= 0 <= ref.high)
    assert merged["summary"]["noise_floor"]["mean"] == pytest.approx(summary["standard-aa"]["vs_standard"]["mean"])
    md = (tmp_path / "m" / "race.md").read_text()
    assert "Merged from separate runs" in md and "Noise floor" in md
    capsys.readouterr()
    # the same (arm, seed) twice, or a different race, is refused with a one-line message
    assert main(["race", "--merge", files[0], files[0], "--out", str(tmp_path / "x")]) == 2
    assert "arm 'cggr' of seed 0 appears in more than one file" in capsys.readouterr().err
    assert main(["race", *common, "--arms", "random", "--ratio", "0.5", "--out", str(tmp_path / "d")]) == 0
    capsys.readouterr()
    assert main(["race", "--merge", files[0], str(tmp_path / "d" / "race.json"), "--out", str(tmp_path / "x")]) == 2
    assert "ratio=0.5" in capsys.readouterr().err
    # another corpus (e.g. other installed packages on another machine) cannot be paired either
    other = json.loads((tmp_path / "b" / "race.json").read_text())
    other["settings"]["data_info"]["train_sequences"] += 1
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert main(["race", "--merge", files[0], str(tmp_path / "other.json"), "--out", str(tmp_path / "x")]) == 2
    assert "data_info.train_sequences" in capsys.readouterr().err
    # a seed whose arms started from different weights (another model) cannot be paired
    other = json.loads((tmp_path / "b" / "race.json").read_text())
    other["arms"][0]["init_digest"] = "0" * 16
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert main(["race", "--merge", files[0], str(tmp_path / "other.json"), "--out", str(tmp_path / "x")]) == 2
    assert "started from different weights" in capsys.readouterr().err


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_cggr_loss_arm_fused_head_equals_loss_on_materialised_logits(softcap):
    """The cggr-loss arm's fused head (forward_hidden) gives the loss and gradients of CGGRLoss(logits, targets)."""
    import copy

    import torch

    from cggr import CGGRLoss
    from cggr.cli.race import Arm

    torch.manual_seed(0)
    if softcap is None:
        cfg = transformers.LlamaConfig(
            vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
        )
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Gemma2Config(
            vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=64, final_logit_softcapping=softcap,
        )
        model = transformers.Gemma2ForCausalLM(cfg)
    model = model.double()
    ids = torch.randint(0, 97, (6, 13))
    mask = torch.ones(6, 13, dtype=torch.bool)
    mask[1, 9:] = False  # right padding
    mask[4, 5:] = False
    labels = ids.masked_fill(~mask, -100)
    race_cfg = RaceConfig(ratio=0.4, device="cpu", dtype="float32")

    arm = Arm("cggr-loss", model, race_cfg, 1, 0.0, torch.device("cpu"), fused_head=True)
    assert arm.head is not None
    loss = arm.loss(ids, mask, labels)
    loss.backward()

    ref_model = copy.deepcopy(model)
    ref_model.zero_grad(set_to_none=True)
    logits = ref_model(input_ids=ids, attention_mask=mask.long()).logits[:, :-1]  # (6, 12, 97)
    crit = CGGRLoss(scoring="combined", selection="topk", dynamic_threshold=False, min_tokens_ratio=0.4,
                    warmup_steps=0)
    ref = crit(logits, labels[:, 1:])
    ref.backward()
    assert torch.allclose(loss, ref, rtol=1e-9, atol=1e-10)
    metrics = arm.criterion.get_metrics()
    assert metrics["tokens_selected"] == crit.get_metrics()["tokens_selected"] < metrics["tokens_total"]
    # the fused head keeps its softmax statistics (lse) in fp32, so fp64 models agree to fp32 precision
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert p.grad is not None and q.grad is not None, name
        scale = q.grad.abs().max().item()
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5 * scale, msg=lambda m, n=name: f"{n}: {m}")


def _fake_clock_race(monkeypatch, small_config, tmp_path, durations, **overrides):
    clock = fake_clock.install(monkeypatch, durations)
    settings = dict(model=str(small_config), data="code", minutes=0.05, router_layers=1, batch_size=2, seq_len=32,
                    evals=4, eval_sequences=4, heldout_blocks=16, out=str(tmp_path), progress=False, plot=False)
    settings.update(overrides)
    return run_race(RaceConfig(**settings), log=lambda *_: None, clock=clock), clock


def test_no_arm_runs_past_its_budget_with_a_fake_clock(small_config, tmp_path, monkeypatch):
    """Steps cost 0.05 / 0.08 / 0.05 / 0.11 s of a fake clock; the budget is 3 s. Every arm stops before the step
    that would overrun it (never after), close to the budget; the ladder's decay branches keep to their own."""
    from cggr.cli.race import probe_indices

    durations = [0.05, 0.08, 0.05, 0.11]
    payload, _ = _fake_clock_race(monkeypatch, small_config, tmp_path, durations, arms=ARMS, reference=True,
                                  reference_steps=2, reference_blocks=512)  # reducible arms: a 2-step reference
    budget = 3.0
    s = payload["settings"]
    probe = probe_indices(s["heldout_blocks"], s["probe_blocks"]).tolist()
    for a in payload["arms"]:
        # the curve's last point is the final model's probe loss: the probe blocks of the full evaluation
        full_blocks = [a["block_losses"][i] for i in probe]
        assert a["probe_loss"] == pytest.approx(sum(full_blocks) / len(full_blocks), abs=1e-5)
        assert a["budget_seconds"] == pytest.approx(budget)
        assert a["train_seconds"] <= budget + 1e-9, a["arm"]
        assert budget - a["train_seconds"] < 2 * max(durations), a["arm"]  # not stopped long before the end
        assert a["max_step_seconds"] <= max(durations) + 1e-9
        fractions = [p["fraction"] for p in a["curve"]]
        assert fractions == [0.0, 0.25, 0.5, 0.75, 1.0]
        times = [p["time_s"] for p in a["curve"]]
        assert all(t <= budget for t in times) and times == sorted(times)
        assert [r["rung"] for r in a["ladder"]] == [0.25, 0.5, 0.75]
        for r in a["ladder"]:
            assert r["branch_at_s"] >= 0.8 * r["rung"] * budget - 1e-9  # the branch starts in the stable phase
            assert r["decay_s"] <= 0.2 * r["rung"] * budget + 1e-9 and r["decay_steps"] >= 1
            assert r["budget_s"] == pytest.approx(r["branch_at_s"] + r["decay_s"], abs=2e-3)


def test_a_step_longer_than_the_budget_is_never_started(small_config, tmp_path, monkeypatch):
    """A 2 s step against a 1.2 s budget: the arm takes no step at all, and its curve still has every point
    (the initial state's loss)."""
    payload, clock = _fake_clock_race(monkeypatch, small_config, tmp_path, [2.0], arms=("standard",), minutes=0.02,
                                      ladder=())
    a = payload["arms"][0]
    assert a["steps"] == 0 and a["train_seconds"] == 0.0
    assert [p["fraction"] for p in a["curve"]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert len({p["heldout_loss"] for p in a["curve"]}) == 1
    assert len(clock.steps) == 2  # only the two untimed warm-up steps ran


def test_plan_chunk_stops_before_an_overrun():
    from cggr.cli.race import plan_chunk

    assert plan_chunk(0.0, 0.3, 1.0, 1.0, 100) == 3  # 0.9 s fits, a 4th step would end at 1.2 s
    assert plan_chunk(0.75, 0.3, 1.0, 1.0, 100) == 0  # 0.25 s left, a step needs 0.3 s: stop now
    assert plan_chunk(0.0, 0.1, 10.0, 0.45, 100) == 5  # the next evaluation at 0.45 s: crossed by the 5th step
    assert plan_chunk(0.0, 0.1, 10.0, 5.0, 8) == 8  # at most max_steps per chunk
    assert plan_chunk(0.5, 0.1, 10.0, 0.4, 8) == 1  # an event already passed: one step


def test_seeds_reproduce_bit_for_bit_and_are_paired(small_config, tmp_path, monkeypatch):
    """With the same (fake) clock two runs of a two-seed race are identical bit for bit; within a seed every arm
    starts from the same weights and (but the A/A arm) the same order; the seeds differ in both."""
    kwargs = dict(arms=("standard", "random", "standard-aa"), seeds=2, minutes=0.012, ladder=(0.5,))
    first, _ = _fake_clock_race(monkeypatch, small_config, tmp_path / "1", [0.05], **kwargs)
    monkeypatch.undo()
    second, _ = _fake_clock_race(monkeypatch, small_config, tmp_path / "2", [0.05], **kwargs)
    keys = ("arm", "seed", "data_seed", "order", "steps", "init_digest", "first_sequences", "block_losses",
            "heldout_loss", "curve", "ladder", "tokens_backpropagated")
    for a, b in zip(first["arms"], second["arms"], strict=True):
        for k in keys:
            if k in ("curve", "ladder"):
                assert [p["heldout_loss"] for p in a[k]] == [p["heldout_loss"] for p in b[k]], (a["arm"], k)
            else:
                assert a[k] == b[k], (a["arm"], a["seed"], k)
    rows = {(a["arm"], a["seed"]): a for a in first["arms"]}
    for seed in (0, 1):
        std, rnd, aa = rows[("standard", seed)], rows[("random", seed)], rows[("standard-aa", seed)]
        assert std["init_digest"] == rnd["init_digest"] == aa["init_digest"]
        n = min(len(std["first_sequences"]), len(rnd["first_sequences"]))
        assert std["first_sequences"][:n] == rnd["first_sequences"][:n]
        assert aa["first_sequences"][:n] != std["first_sequences"][:n]  # the A/A arm: another data order
        assert std["data_seed"] == seed and aa["data_seed"] == seed + 1_000_003
    assert rows[("standard", 0)]["init_digest"] != rows[("standard", 1)]["init_digest"]
    assert rows[("standard", 0)]["first_sequences"] != rows[("standard", 1)]["first_sequences"]
    # the running order rotates with the seed
    assert [rows[(a, 0)]["order"] for a in kwargs["arms"]] == [0, 1, 2]
    assert [rows[(a, 1)]["order"] for a in kwargs["arms"]] == [2, 0, 1]


def test_data_seed_is_separate_from_the_init_seed(small_config, tmp_path, monkeypatch):
    base, _ = _fake_clock_race(monkeypatch, small_config, tmp_path / "a", [0.05], arms=("standard",), minutes=0.01,
                               ladder=())
    monkeypatch.undo()
    other, _ = _fake_clock_race(monkeypatch, small_config, tmp_path / "b", [0.05], arms=("standard",), minutes=0.01,
                                ladder=(), data_seed=7)
    a, b = base["arms"][0], other["arms"][0]
    assert a["init_digest"] == b["init_digest"]  # same weights
    assert a["first_sequences"] != b["first_sequences"] and b["data_seed"] == 7  # another order
    assert other["settings"]["data_seeds"] == [7] and other["settings"]["seeds"] == [0]


def test_device_race_script_starts_waits_and_collects(small_config, tmp_path):
    """benchmarks/device_race.sh: a detached race, polled by repeated calls, its outputs copied to $OUT."""
    import os
    import shutil
    import subprocess
    from pathlib import Path

    if shutil.which("bash") is None or shutil.which("setsid") is None:
        pytest.skip("needs bash and setsid")
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "device_race.sh"
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, CGGR_RACE_STATE=str(tmp_path / "state"), OUT=str(out))
    args = ["--model", str(small_config), "--minutes", "0.003", "--arms", "standard", "--router-layers", "1",
            "--batch-size", "2", "--seq-len", "32", "--evals", "1", "--eval-sequences", "4", "--device", "cpu"]
    first = subprocess.run(["bash", str(script), "t", "0", *args], env=env, capture_output=True, text=True,
                           timeout=300)
    assert first.returncode == 0 and "started race t" in first.stdout, first.stdout + first.stderr
    done = subprocess.run(["bash", str(script), "t", "240"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "DONE (t)" in done.stdout, done.stdout + done.stderr
    payload = json.loads((out / "race-t.json").read_text())
    assert [a["arm"] for a in payload["arms"]] == ["standard"]
    assert math.isfinite(payload["arms"][0]["heldout_loss"])
    assert (out / "race-t.log").is_file() and (out / "race-t.md").is_file()
    bad = subprocess.run(["bash", str(script), "no good", "1"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "NAME must be" in bad.stderr


# ------------------------------------------------------------------ one LM head for every arm (--head)
def _tiny_causal_lm(kind: str = "llama", tie: bool = False):
    import torch

    torch.manual_seed(0)
    if kind == "gemma2":  # final-logit softcapping
        cfg = transformers.Gemma2Config(
            vocab_size=89, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=64, final_logit_softcapping=4.0,
        )
        return transformers.Gemma2ForCausalLM(cfg)
    cfg = transformers.LlamaConfig(
        vocab_size=89, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie,
    )
    return transformers.LlamaForCausalLM(cfg)


def _padded_batch(batch: int = 5, seq: int = 11, vocab: int = 89):
    import torch

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.bool)
    mask[1, 7:] = False  # right padding
    mask[3, 4:] = False
    labels = ids.masked_fill(~mask, -100)
    labels[0, 5] = -100  # an ignored label inside a sequence
    labels[2, 1:4] = -100
    return ids, mask, labels


@pytest.mark.parametrize(("kind", "tie"), [("llama", False), ("llama", True), ("gemma2", False)])
def test_standard_arm_fused_head_equals_the_hf_loss_and_gradients(kind, tie):
    """standard with the fused head: linear_cross_entropy(hidden[:, :-1], W, labels[:, 1:]) = HF's own loss."""
    import copy

    import torch

    from cggr.cli.race import Arm

    model = _tiny_causal_lm(kind, tie)  # fp32
    ref_model = copy.deepcopy(model)
    ids, mask, labels = _padded_batch()
    arm = Arm("standard", model, RaceConfig(device="cpu", dtype="float32"), 1, 0.0, torch.device("cpu"),
               fused_head=True)
    assert arm.head is not None and arm.wrapper is None and arm.criterion is None
    head_calls = []
    model.get_output_embeddings().register_forward_hook(lambda *_: head_calls.append(1))
    loss = arm.loss(ids, mask, labels)
    loss.backward()
    assert head_calls == []  # the logits were never computed by the head module

    ref = ref_model(input_ids=ids, attention_mask=mask.long(), labels=labels).loss
    ref.backward()
    # an independent fp64 reference of the same quantity: mean next-token NLL over the valid targets
    logits = ref_model(input_ids=ids, attention_mask=mask.long()).logits.detach().double()[:, :-1]  # (B, T-1, V)
    targets = labels[:, 1:]
    valid = targets != -100
    nll = -torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]  # (B, T-1)
    brute = (nll * valid).sum() / valid.sum()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.detach().double(), brute, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert p.grad is not None and q.grad is not None, name
        scale = q.grad.abs().max().item()
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5 * scale, msg=lambda m, n=name: f"{n}: {m}")


def _recording_arms(monkeypatch):
    """Replace race.Arm with a subclass that keeps its instances and counts the LM head module's calls with grad.

    Calls without grad (the cggr arm's router, the held-out evaluation) are not the training loss's: not counted.
    """
    import torch

    from cggr.cli import race
    from cggr.cli.race import train

    made = []

    class Recording(race.Arm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.head_calls = []

            def hook(*_):
                if torch.is_grad_enabled():
                    self.head_calls.append(1)

            self.model.get_output_embeddings().register_forward_hook(hook)
            made.append(self)

    monkeypatch.setattr(train, "Arm", Recording)  # the name train_arm builds its arms with
    return made


@pytest.mark.parametrize("head", ["fused", "logits"])
def test_head_option_sets_the_head_of_every_arm(small_config, tmp_path, monkeypatch, head):
    """--head fused: every arm trains through the hidden-state head (never the head module's logits), CGGRModel
    with fused_head=True; --head logits: every arm on the logits, CGGRModel with fused_head=False."""
    made = _recording_arms(monkeypatch)
    cfg = RaceConfig(model=str(small_config), data="code", minutes=0.004, router_layers=1, batch_size=2, seq_len=32,
                     evals=1, eval_sequences=4, heldout_blocks=8, out=str(tmp_path), progress=False, device="cpu",
                     head=head, arms=ARMS, ladder=(), reference=True, reference_steps=2,
                     reference_blocks=256)
    payload = run_race(cfg, log=lambda *_: None)
    fused = head == "fused"
    assert payload["settings"]["head"] == head and payload["settings"]["head_option"] == head
    assert ("fused (linear cross-entropy" in (tmp_path / "race.md").read_text()) == fused
    runners = made[1::2]  # each arm: an untimed scratch arm, then the runner
    assert [r.arm for r in runners] == list(ARMS) and [r.arm for r in made[::2]] == list(ARMS)
    for r in made:
        assert r.fused_head is fused, r.arm
        assert r.pass_mask is False  # code blocks have no padding: no attention mask (no HF host sync on GPUs)
        if r.wrapper is not None:
            assert r.wrapper.fused_head is fused
            assert (r.wrapper._fused_for(r.device) is not None) == fused
        else:
            assert (r.head is not None) == fused
        # the head module computes training logits on the logits path only
        assert (len(r.head_calls) == 0) == fused, (r.arm, len(r.head_calls))
    assert all(math.isfinite(a["heldout_loss"]) for a in payload["arms"])


def test_auto_head_mirrors_cggr_model_and_fused_is_refused_where_impossible():
    import torch

    from cggr import CGGRModel
    from cggr.cli.presets import CLIError
    from cggr.cli.race import resolve_head

    model = _tiny_causal_lm()
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # device objects only: nothing runs on them
    for device in (cpu, cuda):
        auto = resolve_head("auto", model, device)
        assert auto is (CGGRModel(model, num_router_layers=1)._fused_for(device) is not None)
        assert resolve_head("fused", model, device) is True and resolve_head("logits", model, device) is False
    assert resolve_head("auto", model, cuda) is True and resolve_head("auto", model, cpu) is False

    class Scaled(torch.nn.Linear):  # a head that is not a plain nn.Linear cannot be fused
        def forward(self, x):
            return 2.0 * super().forward(x)

    model.lm_head = Scaled(32, 89, bias=False)
    assert resolve_head("auto", model, cuda) is False
    with pytest.raises(CLIError, match="--head fused is not possible for LlamaForCausalLM") as info:
        resolve_head("fused", model, cpu)
    assert "\n" not in str(info.value)


def test_bad_head_value_is_a_one_line_error(tmp_path):
    from cggr.cli.presets import CLIError

    with pytest.raises(CLIError) as info:
        run_race(RaceConfig(head="hidden", out=str(tmp_path), progress=False), log=lambda *_: None)
    assert str(info.value) == "--head must be one of auto, fused, logits, got 'hidden'"
    assert not list(tmp_path.iterdir())  # refused before any work


def test_head_option_on_the_command_line(small_config, tmp_path, capsys):
    assert main(["race", "--head", "hidden", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--head must be one of auto, fused, logits, got 'hidden'" in err
    out = tmp_path / "cli"
    assert main(["race", "--model", str(small_config), "--data", "code", "--minutes", "0.003", "--router-layers",
                 "1", "--batch-size", "2", "--seq-len", "32", "--evals", "1", "--eval-sequences", "4", "--no-progress",
                 "--device", "cpu", "--arms", "standard,random", "--head", "fused", "--out", str(out)]) == 0
    assert json.loads((out / "race.json").read_text())["settings"]["head"] == "fused"


def test_token_counts_accumulated_on_the_device_match_the_arithmetic(small_config, tmp_path, monkeypatch):
    """The counts summed per chunk without host syncs: every block is full (T = 32 targets 31 tokens), standard
    back-propagates B per step, cggr and random k, cggr-loss all S with a quarter of the tokens in its loss."""
    # the arms whose counts the arithmetic below spells out (the selection-rule arms:
    # tests/cli/test_cli_race_selection.py)
    arms = ("standard", "cggr", "cggr-loss", "random", "standard-aa")
    payload, _ = _fake_clock_race(monkeypatch, small_config, tmp_path, [0.05], arms=arms, minutes=0.01, ladder=())
    s = payload["settings"]
    for a in payload["arms"]:
        per_step = s["scanned_per_step"] if a["arm"] in ("cggr", "cggr-loss", "random") else s["batch_size"]
        assert a["steps"] >= 1
        assert a["tokens_scanned"] == a["steps"] * per_step * 31
        if a["arm"] in ("cggr", "random"):
            assert a["tokens_backpropagated"] == a["tokens_in_loss"] == a["steps"] * s["trained_per_step"] * 31
        elif a["arm"] == "cggr-loss":
            assert a["tokens_backpropagated"] == a["tokens_scanned"]
            assert a["tokens_in_loss"] == pytest.approx(0.25 * a["tokens_scanned"], rel=0.05)
        else:
            assert a["tokens_backpropagated"] == a["tokens_in_loss"] == a["tokens_scanned"]
        assert a["router_tokens"] == (a["steps"] * per_step * 32 if a["arm"] == "cggr" else 0)
        assert math.isfinite(a["last_train_loss"])


def test_merge_refuses_races_trained_with_different_heads(tmp_path):
    from cggr.cli.presets import CLIError
    from cggr.cli.report import merge_race_files

    def race_file(name, arm, head):
        settings = {"model": "m", "parameters": 1, "data": "code", "minutes_per_arm": 1, "ratio": 0.25,
                    "scan_multiplier": 4.0, "batch_size": 2, "scanned_per_step": 8, "router_layers": 1, "lr": 1e-3,
                    "seed": 0, "ratio_warmup_steps": 0, "scoring": "combined", "evals": 1}
        if head is not None:
            settings["head"] = head
        row = {"arm": arm, "init_digest": "d", "heldout_loss": 1.0}
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"settings": settings, "environment": {"command": name}, "arms": [row]}))
        return path

    fused, logits = race_file("a", "standard", "fused"), race_file("b", "cggr", "logits")
    with pytest.raises(CLIError, match="has head='logits', the first file 'fused'"):
        merge_race_files([fused, logits])
    old = race_file("c", "random", None)  # recorded before --head: the arms' heads were mixed
    with pytest.raises(CLIError, match="head="):
        merge_race_files([fused, old])
    assert len(merge_race_files([fused, race_file("d", "cggr", "fused")])["arms"]) == 2
    assert len(merge_race_files([old, race_file("e", "cggr", None)])["arms"]) == 2


def test_a_registered_arm_runs_in_the_race(small_config, tmp_path, monkeypatch):
    """The docs' example: one register_arm call makes a new arm (sampled selection) raceable and reported."""
    from cggr.cli import race

    saved = dict(race.ARM_SPECS)  # registered for this test only: the registry is restored below
    try:
        _race_a_registered_arm(race, monkeypatch, small_config, tmp_path)
    finally:
        race.ARM_SPECS.clear()
        race.ARM_SPECS.update(saved)


def _race_a_registered_arm(race, monkeypatch, small_config, tmp_path):
    race.register_arm(race.ArmSpec("my-sampled", kind="model", selection="sampled", router=True, scans=True,
                                   options=(("temperature", 0.5),), color="tab:purple", marker="v"))
    payload, _ = _fake_clock_race(monkeypatch, small_config, tmp_path, [0.05], arms=("standard", "my-sampled"),
                                  minutes=0.01, ladder=())
    row = payload["arms"][1]
    assert row["arm"] == "my-sampled" and row["steps"] >= 1 and row["router_tokens"] > 0
    assert row["sequences_scanned"] == row["steps"] * payload["settings"]["scanned_per_step"]
    assert [e["arm"] for e in payload["summary"]["arms"]] == ["standard", "my-sampled"]
    with pytest.raises(ValueError, match="kind must be one of plain, model, loss"):
        race.register_arm(race.ArmSpec("x", kind="other"))
    with pytest.raises(ValueError, match="cannot scan"):
        race.register_arm(race.ArmSpec("y", kind="plain", scans=True))


@pytest.mark.parametrize("arm", ["standard", "cggr", "cggr-loss", "random"])
@pytest.mark.parametrize("fused", [False, True])
def test_unpadded_batches_without_an_attention_mask_give_the_same_loss(arm, fused):
    """On data without padding the race calls the model without an attention mask (no host sync in Hugging Face's
    mask preparation on GPUs): same loss and same gradients as with an all-ones mask."""
    import copy

    import torch

    from cggr.cli.race import Arm

    model = _tiny_causal_lm()
    ids = torch.randint(0, 89, (8, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids, dtype=torch.bool)
    labels = ids.clone()
    cfg = RaceConfig(device="cpu", dtype="float32", ratio=0.25)
    losses, grads = [], []
    for pass_mask in (True, False):
        m = copy.deepcopy(model)
        runner = Arm(arm, m, cfg, 1, 0.0, torch.device("cpu"), fused_head=fused, seed=5)
        runner.pass_mask = pass_mask
        loss = runner.loss(ids, mask, labels)
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in m.parameters() if p.grad is not None])
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(grads[0], grads[1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
