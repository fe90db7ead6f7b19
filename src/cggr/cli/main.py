"""The ``cggr`` command: ``cggr info``, ``cggr bench``, ``cggr race``.

User errors (unknown preset, missing path, ratio outside (0, 1], non-positive minutes, empty corpus) end the
program with a one-line ``cggr <command>: error: ...`` message and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import platform
import sys
from collections.abc import Sequence

import torch

from cggr._validation import SCORING_MODES
from cggr.cli.presets import PRESETS, CLIError
from cggr.cli.timing import package_version


class _Formatter(argparse.HelpFormatter):
    """Help text wrapped at spaces only: arm names such as ``cggr-reducible-self`` stay whole."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        import textwrap

        return textwrap.wrap(self._whitespace_matcher.sub(" ", text).strip(), width, break_on_hyphens=False)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``cggr race: error: <message> (see cggr race --help)``, exit status 2; help
    wrapped at spaces only."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_float(name: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"{name} must be > 0, got {text}")
        return value

    return parse


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"ratio must be a number in (0, 1], got {text!r}") from None
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise argparse.ArgumentTypeError(f"ratio must be in (0, 1], got {text}")
    return value


def _positive_int(name: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {text}")
        return value

    return parse


def _arms(text: str) -> tuple[str, ...]:
    from cggr.cli.race import ARM_SPECS

    arms = tuple(a.strip() for a in text.split(",") if a.strip())
    bad = [a for a in arms if a not in ARM_SPECS]
    if bad or not arms:
        raise argparse.ArgumentTypeError(
            f"unknown arm(s) {', '.join(bad) or '(none)'}; choose from {', '.join(ARM_SPECS)}")
    if len(set(arms)) != len(arms):
        raise argparse.ArgumentTypeError(f"each arm at most once, got {text}")
    return arms


def _fractions(text: str) -> tuple[float, ...]:
    if text.strip().lower() == "none":
        return ()
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions such as 0.25,0.5,0.75, got {text!r}") \
            from None
    return values


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny",
                   help=f"preset ({', '.join(PRESETS)}), a config.json (random init) or a local pretrained "
                        "model folder (default: tiny)")
    p.add_argument("--ratio", type=_ratio, default=0.25,
                   help="share of sequences (cggr, random) or tokens (cggr-loss) trained on, in (0, 1] (default 0.25)")
    p.add_argument("--router-layers", type=_positive_int("--router-layers"), default=None,
                   help="layers of the truncated router (default: preset's; tiny 2, smollm 4)")
    p.add_argument("--arms", type=_arms, default=None,
                   help="comma-separated arms among standard, cggr, cggr-loss, random, standard-aa (the A/A arm: "
                        "standard on another data order), cggr-sampled (Gumbel-top-k by router loss), "
                        "cggr-importance (importance sampling, 1/p weights), cggr-reducible and "
                        "cggr-reducible-sampled (RHO-LOSS reducible loss by the router's loss), "
                        "cggr-reducible-self (by the model's own loss, scan 2B; a race's reducible arms need "
                        "--reference) and any registered arm (race default: standard,cggr,random,standard-aa; "
                        "bench default: every arm but the A/A one)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="auto: bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--seed", type=int, default=0,
                   help="init seed (initial weights) of the first replicate; race: replicate i uses seed + i")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="cggr",
        description="Confidence-Gated Gradient Routing: measure whether CGGR makes YOUR training faster.",
    )
    parser.add_argument("--version", action="version",
                        version=f"cggr {package_version('cggr')} (torch {torch.__version__})")
    sub = parser.add_subparsers(dest="command", metavar="{info,bench,race}", parser_class=_Parser)
    sub.required = True

    sub.add_parser("info", help="versions, device, kernels and attention backends",
                   description="Print versions, the device, which kernels (Triton/PyTorch) and attention "
                               "backends are available, and which would be used.")

    bench = sub.add_parser(
        "bench", help="training-step throughput of every arm, side by side",
        description="Median step time (CUDA events on GPU, after warm-up), samples/s, speed-up over standard and "
                    "peak memory of each arm on the same model and the same batch, for several (B, T).",
    )
    _common(bench)
    bench.add_argument("--shapes", default=None, help="comma-separated BxT, e.g. 4x512,16x512 (default: preset's)")
    bench.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps (default 3)")
    bench.add_argument("--iters", type=_positive_int("--iters"), default=10, help="timed steps (default 10)")
    bench.add_argument("--out", default="cggr-bench", help="output folder for bench.json and bench.md")
    bench.add_argument("--name", default="bench", help="file stem of the outputs (default bench)")

    race = sub.add_parser(
        "race", help="plain training vs CGGR for the same wall-clock budget",
        description="Train the same model from the same initialisation on the same data order in each arm "
                    "(standard, cggr, cggr-loss, random control) for the same wall-clock budget; report steps, "
                    "sequences and tokens processed, held-out loss (and accuracy) and the difference to standard. "
                    "Writes <out>/race.json, race.md and race.png.",
    )
    _common(race)
    race.add_argument("--data", default="code",
                      help="code (Python's standard library, default), code+packages (the standard library plus "
                           "every installed package's .py files: several times more code, for GPU presets, so a "
                           "race does not repeat its training data), arithmetic (generated word problems), a path "
                           "(text file, folder of text files, JSONL with a 'text' field) or a quoted glob "
                           "('src/**/*.py')")
    race.add_argument("--minutes", type=_positive_float("--minutes"), default=None,
                      help="wall-clock training budget per arm (default: preset's; tiny 0.4)")
    race.add_argument("--protocol", choices=("free-lunch", "equal-scan"), default="free-lunch",
                      help="free-lunch (default): standard trains on B sequences per step, the selecting arms scan "
                           "B/ratio and train on B; equal-scan: every arm reads the same B sequences per step, the "
                           "selecting arms train on ratio x B of them")
    race.add_argument("--scan-multiplier", type=float, default=None,
                      help="sequences the selecting arms scan per step, as a multiple of the standard batch "
                           "(overrides --protocol: 1/ratio is free-lunch, 1 equal-scan)")
    race.add_argument("--seeds", type=_positive_int("--seeds"), default=1,
                      help="paired replicates (default 1): replicate i uses init seed --seed + i and data seed "
                           "--data-seed + i for every arm; the report gives 95%% intervals over them (paired "
                           "Student-t) and calls a gap whose interval contains 0 a tie. To split a race across "
                           "calls, run e.g. --seed 0 --seeds 1 and --seed 1 --seeds 1 (and/or different --arms) and "
                           "combine the race.json files with --merge")
    race.add_argument("--data-seed", type=int, default=None,
                      help="data seed (sequence order, random picks) of the first replicate (default: --seed)")
    race.add_argument("--ladder", type=_fractions, default=None,
                      help="budget-ladder rungs for time-to-target, as comma-separated fractions of the budget "
                           "(default 0.25,0.5,0.75; 'none' for no ladder): at 80%% of each rung budget a copy of "
                           "the arm decays its learning rate to 0 over 20%% of it, off the clock, and is evaluated")
    race.add_argument("--ratio-warmup-steps", type=int, default=0,
                      help="CGGR curriculum: optimizer steps over which the kept share falls linearly from 1 to "
                           "--ratio (default 0: the ratio from the first step, so every step trains on the same "
                           "number of sequences)")
    race.add_argument("--scoring", default="combined",
                      help="token difficulty used by the cggr and cggr-loss arms, one of "
                           f"{', '.join(SCORING_MODES)} (default combined)")
    race.add_argument("--head", default="auto",
                      help="LM head of every arm's training loss: fused (linear cross-entropy on the final hidden "
                           "states, fp32 logit math), logits (the model's own logits) or auto (default: fused for "
                           "a causal LM with a fusable head on CUDA, as CGGRModel does, else logits)")
    race.add_argument("--batch-size", type=_positive_int("--batch-size"), default=None,
                      help="standard arm's sequences per step (default: preset's)")
    race.add_argument("--seq-len", type=_positive_int("--seq-len"), default=None,
                      help="tokens per sequence for text data (default: preset's)")
    race.add_argument("--lr", type=_positive_float("--lr"), default=None, help="peak learning rate (default: preset's)")
    race.add_argument("--evals", type=_positive_int("--evals"), default=8,
                      help="held-out evaluations per arm, at equal fractions of the budget (default 8)")
    race.add_argument("--eval-sequences", type=_positive_int("--eval-sequences"), default=64,
                      help="probe blocks (or problems) of the held-out set evaluated at the --evals points and at "
                           "the ladder rungs (default 64)")
    race.add_argument("--heldout-blocks", type=_positive_int("--heldout-blocks"), default=1024,
                      help="held-out blocks (or arithmetic problems) evaluated at the end of each arm (default 1024)")
    race.add_argument("--heldout-cap", type=_positive_int("--heldout-cap"), default=16,
                      help="at most this many held-out blocks from any one held-out file (default 16)")
    race.add_argument("--reference", action="store_true",
                      help="train a reference model (the race's architecture, fresh weights) on "
                           "--reference-fraction of the training blocks before the arms, and score the other blocks "
                           "with it (RHO-LOSS); every arm then trains on those other blocks only, and the one-off "
                           "cost is reported on its own line. Needed by the cggr-reducible arms")
    race.add_argument("--reference-fraction", type=float, default=0.5,
                      help="share of the training blocks the reference trains on (default 0.5)")
    race.add_argument("--reference-steps", type=_positive_int("--reference-steps"), default=200,
                      help="the reference model's optimizer steps, batch = the standard batch (default 200)")
    race.add_argument("--reference-blocks", type=_positive_int("--reference-blocks"), default=None,
                      help="score at most this many of the other training blocks (a seeded subset; every arm then "
                           "trains on those only). Default: all of them")
    race.add_argument("--out", default="cggr-race", help="output folder (default ./cggr-race)")
    race.add_argument("--name", default="race", help="file stem of the outputs (default race)")
    race.add_argument("--no-progress", action="store_true", help="no progress bars")
    race.add_argument("--merge", nargs="+", metavar="JSON", default=None,
                      help="instead of racing, combine race.json files of the same race run in separate calls (by "
                           "seed and/or by arm; same settings) into <out>/<name>.json|md|png, arms paired by seed, "
                           "with the intervals; each (arm, seed) may appear once")
    return parser


def _import_error(module: str) -> str | None:
    """Why ``module`` cannot be imported (``None`` when it can)."""
    try:
        importlib.import_module(module)
    except ImportError as exc:
        return str(exc)
    return None


def info() -> dict[str, object]:
    """Versions, device, kernel and attention-backend availability (printed by ``cggr info``)."""
    cuda = torch.cuda.is_available()
    triton = package_version("triton")
    broken = _import_error("triton") if triton is not None else None
    if broken is not None:
        triton = f"{triton}, installed but not importable ({broken})"
    forced = os.environ.get("CGGR_IMPL")
    if forced == "torch":
        kernels = "torch (forced by CGGR_IMPL=torch)"
    elif cuda and triton is not None and broken is None:
        kernels = "triton (CUDA device and Triton importable)"
    elif cuda:
        kernels = "torch (Triton not importable: pip install 'cggr[cuda]')"
    else:
        kernels = "torch (no CUDA device; Triton kernels run on CUDA only)"
    out: dict[str, object] = {
        "cggr": package_version("cggr"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton,
        "transformers": package_version("transformers"),
        "tokenizers": package_version("tokenizers"),
        "flash_attn": package_version("flash_attn"),
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({torch.get_num_threads()} threads)",
        "cuda": torch.version.cuda if cuda else None,
        "cuda_devices": torch.cuda.device_count() if cuda else 0,
        "CGGR_IMPL": forced,
        "kernels used": kernels,
    }
    try:
        from cggr.flash import get_flash_attention_info
    except ImportError:
        sdpa = hasattr(torch.nn.functional, "scaled_dot_product_attention")
        out["attention backends"] = {"sdpa": sdpa, "eager": True, "flash_attention_2": out["flash_attn"] is not None}
        out["attention used"] = "sdpa" if sdpa else "eager"
    else:
        out["attention backends"] = get_flash_attention_info()
    return out


def _print_info(data: dict[str, object]) -> None:
    width = max(map(len, data))
    for key, value in data.items():
        if isinstance(value, dict):
            print(f"{key:<{width}}  " + ", ".join(f"{k}={v}" for k, v in value.items()))
        else:
            print(f"{key:<{width}}  {'–' if value is None else value}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cggr`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "info":
            _print_info(info())
        elif args.command == "bench":
            from cggr.cli.bench import BenchConfig, run_bench
            from cggr.cli.race import ARM_SPECS

            shapes = args.shapes or "8x128"
            if args.shapes is None and args.model in PRESETS:
                preset = PRESETS[args.model]
                shapes = f"{preset.batch_size}x{preset.seq_len},{preset.batch_size * 4}x{preset.seq_len}"
            run_bench(BenchConfig(
                model=args.model, shapes=shapes,
                arms=args.arms or tuple(n for n, a in ARM_SPECS.items() if not a.data_seed_offset), ratio=args.ratio,
                router_layers=args.router_layers, device=args.device, dtype=args.dtype, warmup=args.warmup,
                iters=args.iters, seed=args.seed, out=args.out, name=args.name,
            ))
        elif args.merge:
            from pathlib import Path

            from cggr.cli.report import merge_race_files, write_race_outputs

            write_race_outputs(merge_race_files([Path(p) for p in args.merge]), Path(args.out), args.name)
        else:
            from cggr.cli.race import DEFAULT_ARMS, DEFAULT_LADDER, RaceConfig, run_race

            run_race(RaceConfig(
                model=args.model, data=args.data, minutes=args.minutes, ratio=args.ratio,
                router_layers=args.router_layers, arms=args.arms or DEFAULT_ARMS, device=args.device, seed=args.seed,
                out=args.out, scan_multiplier=args.scan_multiplier, batch_size=args.batch_size, seq_len=args.seq_len,
                lr=args.lr, evals=args.evals, eval_sequences=args.eval_sequences, dtype=args.dtype,
                progress=not args.no_progress, name=args.name, ratio_warmup_steps=args.ratio_warmup_steps,
                scoring=args.scoring, head=args.head, seeds=args.seeds, data_seed=args.data_seed,
                protocol=args.protocol, heldout_blocks=args.heldout_blocks, heldout_cap=args.heldout_cap,
                ladder=DEFAULT_LADDER if args.ladder is None else args.ladder, reference=args.reference,
                reference_fraction=args.reference_fraction, reference_steps=args.reference_steps,
                reference_blocks=args.reference_blocks,
            ))
    except CLIError as exc:
        print(f"cggr {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
