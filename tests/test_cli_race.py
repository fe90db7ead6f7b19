"""``cggr race`` end to end with a few-second budget on every data source (CPU, small model)."""

from __future__ import annotations

import json
import math

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from cggr.cli.data import load_text_data  # noqa: E402
from cggr.cli.main import main  # noqa: E402
from cggr.cli.race import ARMS, RaceConfig, run_race  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("CGGR_CACHE_DIR", str(tmp_path_factory.mktemp("cggr-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def small_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "config.json"
    transformers.LlamaConfig(
        vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256,
    ).to_json_file(path)
    return path


def _check_race(payload, *, with_accuracy: bool):
    arms = payload["arms"]
    assert [a["arm"] for a in arms] == list(ARMS)
    # the same initial weights and the same initial held-out loss in every arm
    assert len({a["init_digest"] for a in arms}) == 1
    assert len({a["curve"][0]["heldout_loss"] for a in arms}) == 1
    # the same data order: every arm reads a prefix of the same sequence stream
    firsts = [a["first_sequences"] for a in arms]
    n = min(map(len, firsts))
    assert n >= 2 and all(f[:n] == firsts[0][:n] for f in firsts)
    s = payload["settings"]
    for a in arms:
        assert a["steps"] >= 1
        assert all(math.isfinite(p["heldout_loss"]) for p in a["curve"])
        assert a["curve"][-1]["fraction"] == 1.0 and len(a["curve"]) == s["evals"] + 1
        assert a["train_seconds"] >= s["minutes_per_arm"] * 60
        per_step = s["batch_size"] if a["arm"] == "standard" else s["scanned_per_step"]
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
    assert (tmp_path / "race.md").read_text().count("| standard |") == 1
    # --head auto on a CPU: every arm on the model's logits, as CGGRModel's own default there
    assert payload["settings"]["head"] == "logits" and payload["settings"]["head_option"] == "auto"
    assert "the model's logits" in (tmp_path / "race.md").read_text()


def test_race_on_arithmetic(small_config, tmp_path):
    cfg = RaceConfig(model=str(small_config), data="arithmetic", minutes=0.015, router_layers=1, batch_size=4,
                     evals=1, eval_sequences=6, out=str(tmp_path), progress=False, scan_multiplier=1.0,
                     train_problems=3000)
    payload = run_race(cfg, log=lambda *_: None)
    _check_race(payload, with_accuracy=True)
    assert payload["settings"]["scanned_per_step"] == 4  # --scan-multiplier 1: equal scan
    assert payload["settings"]["trained_per_step"] == 1


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


def test_arms_run_separately_merge_into_one_race(small_config, tmp_path, capsys):
    common = ["--model", str(small_config), "--data", "code", "--minutes", "0.005", "--router-layers", "1",
              "--batch-size", "2", "--seq-len", "32", "--evals", "1", "--eval-sequences", "4", "--no-progress"]
    assert main(["race", *common, "--arms", "cggr,standard", "--out", str(tmp_path / "a")]) == 0
    assert main(["race", *common, "--arms", "random", "--out", str(tmp_path / "b")]) == 0
    files = [str(tmp_path / "a" / "race.json"), str(tmp_path / "b" / "race.json")]
    assert main(["race", "--merge", *files, "--out", str(tmp_path / "m")]) == 0
    merged = json.loads((tmp_path / "m" / "race.json").read_text())
    assert [a["arm"] for a in merged["arms"]] == ["standard", "cggr", "random"]
    assert [r["arm"] for r in merged["summary"]] == ["standard", "cggr", "random"]
    assert (tmp_path / "m" / "race.png").is_file()
    # a different race (other seed) or the same arm twice is refused with a one-line message
    assert main(["race", *common, "--arms", "random", "--seed", "1", "--out", str(tmp_path / "c")]) == 0
    capsys.readouterr()
    assert main(["race", "--merge", files[0], str(tmp_path / "c" / "race.json"), "--out", str(tmp_path / "x")]) == 2
    assert "seed=1" in capsys.readouterr().err
    assert main(["race", "--merge", files[0], files[0], "--out", str(tmp_path / "x")]) == 2
    assert "appears in more than one file" in capsys.readouterr().err
    # a second run (another machine) brings its own standard anchor: each arm is compared with its run's standard
    assert main(["race", *common, "--arms", "standard,cggr-loss", "--out", str(tmp_path / "d")]) == 0
    assert main(["race", "--merge", files[0], str(tmp_path / "d" / "race.json"), "--out", str(tmp_path / "n")]) == 0
    merged = json.loads((tmp_path / "n" / "race.json").read_text())
    assert [(a["arm"], a["run"]) for a in merged["arms"]] == [("standard", 1), ("standard", 2), ("cggr", 1),
                                                               ("cggr-loss", 2)]
    rows = {r["arm"]: r for r in merged["summary"]}
    assert set(rows) == {"standard (run 1)", "standard (run 2)", "cggr", "cggr-loss"}
    by = {(a["arm"], a["run"]): a["heldout_loss"] for a in merged["arms"]}
    for arm, run in (("cggr", 1), ("cggr-loss", 2)):
        diff = by[(arm, run)] - by[("standard", run)]
        assert rows[arm]["Δ loss"] == f"{diff:+.4f} ({diff / by[('standard', run)]:+.1%})"
    assert "Merged from separate runs" in (tmp_path / "n" / "race.md").read_text()
    # a file recorded before a setting existed merges with one that has that setting's former implicit value
    old = json.loads((tmp_path / "a" / "race.json").read_text())
    del old["settings"]["scoring"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert main(["race", "--merge", str(tmp_path / "old.json"), str(tmp_path / "d" / "race.json"), "--out",
                 str(tmp_path / "o")]) == 0


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


def test_a_step_crossing_several_evaluation_points_records_each_of_them(small_config, tmp_path, monkeypatch):
    """A step slower than the whole budget still leaves an evaluation at every fraction, 1.0 included."""
    import time

    from cggr.cli import race

    real_step = race.Arm.step
    calls = []

    def slow_step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) > 1:  # the first call is the untimed warm-up step
            time.sleep(0.5)
        return out

    monkeypatch.setattr(race.Arm, "step", slow_step)
    cfg = RaceConfig(model=str(small_config), data="code", minutes=0.004, router_layers=1, batch_size=2, seq_len=32,
                     evals=4, eval_sequences=4, out=str(tmp_path), progress=False, arms=("standard",))
    payload = run_race(cfg, log=lambda *_: None)
    curve = payload["arms"][0]["curve"]
    assert [p["fraction"] for p in curve] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert payload["arms"][0]["steps"] == 1
    assert len({p["heldout_loss"] for p in curve[1:]}) == 1  # one evaluation of the one trained state


def test_device_race_script_starts_waits_and_collects(small_config, tmp_path):
    """benchmarks/device_race.sh: a detached race, polled by repeated calls, its outputs copied to $OUT."""
    import os
    import shutil
    import subprocess
    from pathlib import Path

    if shutil.which("bash") is None or shutil.which("setsid") is None:
        pytest.skip("needs bash and setsid")
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "device_race.sh"
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

    monkeypatch.setattr(race, "Arm", Recording)
    return made


@pytest.mark.parametrize("head", ["fused", "logits"])
def test_head_option_sets_the_head_of_every_arm(small_config, tmp_path, monkeypatch, head):
    """--head fused: every arm trains through the hidden-state head (never the head module's logits), CGGRModel
    with fused_head=True; --head logits: every arm on the logits, CGGRModel with fused_head=False."""
    made = _recording_arms(monkeypatch)
    cfg = RaceConfig(model=str(small_config), data="code", minutes=0.004, router_layers=1, batch_size=2, seq_len=32,
                     evals=1, eval_sequences=4, out=str(tmp_path), progress=False, device="cpu", head=head)
    payload = run_race(cfg, log=lambda *_: None)
    fused = head == "fused"
    assert payload["settings"]["head"] == head and payload["settings"]["head_option"] == head
    assert ("fused (linear cross-entropy" in (tmp_path / "race.md").read_text()) == fused
    runners = made[1::2]  # each arm: an untimed scratch arm, then the runner
    assert [r.arm for r in runners] == list(ARMS) and [r.arm for r in made[::2]] == list(ARMS)
    for r in made:
        assert r.fused_head is fused, r.arm
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


def _cli_has_head_option() -> bool:
    import contextlib
    import io

    from cggr.cli.main import build_parser

    with contextlib.redirect_stderr(io.StringIO()):
        try:
            args = build_parser().parse_args(["race", "--head", "fused"])
        except SystemExit:
            return False
    return getattr(args, "head", None) == "fused"


@pytest.mark.skipif(not _cli_has_head_option(), reason="cggr race --head is not in cggr.cli.main yet")
def test_head_option_on_the_command_line(small_config, tmp_path, capsys):
    assert main(["race", "--head", "hidden", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--head must be one of auto, fused, logits, got 'hidden'" in err
    out = tmp_path / "cli"
    assert main(["race", "--model", str(small_config), "--data", "code", "--minutes", "0.003", "--router-layers",
                 "1", "--batch-size", "2", "--seq-len", "32", "--evals", "1", "--eval-sequences", "4", "--no-progress",
                 "--device", "cpu", "--arms", "standard,random", "--head", "fused", "--out", str(out)]) == 0
    assert json.loads((out / "race.json").read_text())["settings"]["head"] == "fused"


def test_token_bookkeeping_is_off_the_clock(small_config, tmp_path, monkeypatch):
    """Reading the token counts (host syncs, more of them in the CGGR arms) is not charged to any arm's budget."""
    import time

    from cggr.cli import race

    real_counts = race.Arm.counts
    calls = []

    def slow_counts(self, mask):
        calls.append(self.arm)
        time.sleep(0.3)
        return real_counts(self, mask)

    monkeypatch.setattr(race.Arm, "counts", slow_counts)
    cfg = RaceConfig(model=str(small_config), data="code", minutes=0.004, router_layers=1, batch_size=2, seq_len=32,
                     evals=1, eval_sequences=4, out=str(tmp_path), progress=False, arms=("standard", "cggr"))
    payload = run_race(cfg, log=lambda *_: None)
    for a in payload["arms"]:
        assert calls.count(a["arm"]) == a["steps"] >= 1  # every timed step counted, with the clock stopped
        assert a["max_step_seconds"] < 0.3
        assert a["tokens_backpropagated"] > 0 and a["tokens_in_loss"] > 0


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
