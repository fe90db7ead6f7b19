"""Shared test configuration: the ``cuda`` and ``slow`` markers.

* ``cuda`` (every test under tests/gpu/): skipped on a machine without a CUDA GPU, with the reason saying so, in
  one line of ``-rs`` for all of them (:func:`pytest_runtest_setup`).
* ``slow``: a test that runs a whole race or takes more than ~10 s on 2 CPU cores. A developer's
  ``python -m pytest`` deselects them (pyproject.toml: ``addopts = "-m 'not slow'"``) and ``python -m pytest -m
  slow`` runs only them; CI (.ci/run, the README's test command) runs both, i.e. every test. The slow tests are
  listed here, in :data:`SLOW`, rather than decorated in place, so that one table says what is slow and why; a
  name listed here that its module does not define is an error (renaming a test cannot silently drop its mark).
"""

from __future__ import annotations

import importlib
import re

import pytest
import torch

from tests._interpret import interpreter_env

#: cggr's Triton kernel modules (imported interpreted by :func:`_import_kernels_interpreted`).
KERNEL_MODULES = ("_utils", "scoring", "linear_cross_entropy", "_linear_ce_tiles", "_linear_ce_launch",
                  "linear_cross_entropy_fused", "linear_cross_entropy_fused_halves", "linear_cross_entropy_fused_split",
                  "moe_routing", "moe_slot_sum", "grouped_gemm")


def _import_kernels_interpreted() -> None:
    """Without a CUDA GPU the Triton kernels run only under the interpreter, which must be on when triton and the
    kernel modules are imported. Import them so here, before any test module: the tests/gpu/ modules (collected
    first) import triton, and would otherwise leave compiled kernels that send every interpreter test module to a
    fresh process (tests/_interpret.py). TRITON_INTERPRET is unset again afterwards (torch.compile must not see
    it); the interpreter modules set it around their own tests."""
    if torch.cuda.is_available():
        return
    try:
        with interpreter_env():
            for name in KERNEL_MODULES:
                importlib.import_module(f"cggr.kernels.{name}")
    except ImportError:  # no triton: the interpreter modules skip themselves
        return


_import_kernels_interpreted()

#: test file -> {test name pattern: why it is slow}. A pattern with ``[`` is matched against the test's name with its
#: parametrisation (``*``: anything), e.g. ``test_x[53-*]``; one without, against the function's name (every case).
#: CPU seconds measured on a 2-core Xeon (one pytest process, OMP_NUM_THREADS=1).
SLOW: dict[str, dict[str, str]] = {
    "test_cli_race.py": {  # whole races (the module's first one also trains the BPE tokenizer of its cache)
        "test_race_on_code_corpus": "whole race, 28 s",
        "test_race_on_arithmetic": "whole race, 8 s",
        "test_race_on_a_jsonl_path_through_the_command_line": "whole race",
        "test_race_with_a_local_pretrained_model_folder": "whole race",
        "test_a_race_split_by_seed_and_by_arm_merges_into_one_report_with_intervals": "three races",
        "test_no_arm_runs_past_its_budget_with_a_fake_clock": "whole race, 8 s",
        "test_a_step_longer_than_the_budget_is_never_started": "whole race (data and tokenizer)",
        "test_seeds_reproduce_bit_for_bit_and_are_paired": "four races, 10 s",
        "test_data_seed_is_separate_from_the_init_seed": "two races",
        "test_device_race_script_starts_waits_and_collects": "a race in a detached process, 30 s",
        "test_head_option_sets_the_head_of_every_arm": "whole races",
        "test_head_option_on_the_command_line": "whole race",
        "test_token_counts_accumulated_on_the_device_match_the_arithmetic": "whole race",
        "test_a_registered_arm_runs_in_the_race": "whole race",
    },
    "test_cli_data_packages.py": {
        "test_race_on_code_packages_with_the_tiny_preset": "whole race on every installed package, 9 s",
    },
    # Triton kernels under the interpreter: the default run keeps each module's fp64 reference checks (every
    # kernel path at small shapes); the larger shapes, tile variants and accumulation modes run with -m slow
    "test_linear_ce_fused_interpret.py": {
        "test_halves_tile_filters_like_the_half_width_tile": "interpreted, 9 s",
        "test_halves_tile_matches_naive[*]": "interpreted, 7 s each",
        "test_tma_descriptor_and_pointer_tiles_agree[*]": "interpreted, 6-7 s each",
        "test_gradient_filter_error_is_bounded_and_tiny_eps_is_exact": "interpreted",
        "test_accumulate_modes_fp16[*]": "interpreted, 4 modes",
    },
    "test_linear_ce_fused_split_interpret.py": {
        "test_d_hidden_vocabulary_splits_and_selected_rows[*]": "interpreted, 12 cases of 2 s",
        "test_accumulate_modes_fp16[*]": "interpreted, 8 cases of 1.3 s",
        "test_large_shared_memory_tiles_match_naive_fp16[*]": "interpreted",
        "test_other_tiles_and_uneven_chunks_give_the_same_gradients": "interpreted",
        "test_gradient_filter_error_is_bounded_and_tiny_eps_is_exact": "interpreted",
        "test_only_some_gradients_requested[*]": "interpreted",
    },
    "test_linear_ce_chunked_interpret.py": {
        "test_forward_stats_outputs_matches_fp64[37-*]": "interpreted, 2 s each",
        "test_forward_stats_outputs_matches_fp64[53-*]": "interpreted, 5 s each",
        "test_linear_cross_entropy_outputs_workspace[shape1-*]": "interpreted, 2 s each",
        "test_only_weight_gradient_and_fallbacks": "interpreted",
        "test_outputs_passes_split_match_the_one_call_path": "interpreted",
    },
    "test_ignored_garbage_interpret.py": {
        "test_scoring_kernel_ignores_garbage_at_ignored_rows[*-stratified]": "interpreted (topk stays)",
        "test_scoring_kernel_ignores_garbage_at_ignored_rows[*-sequence_aware]": "interpreted (topk stays)",
        "test_linear_ce_kernels_ignore_garbage_hidden_rows[0.3-*]": "interpreted (ratio 1 stays)",
    },
    "test_moe_triton_interpret.py": {
        "test_split_and_fused_act_bwd_agree_fp16": "interpreted",
        "test_fused_route_matches_torch[N300-*]": "interpreted",
    },
    "test_row_weights_interpret.py": {
        "test_row_weights_match_fp64[1.0-sum-*]": "interpreted ('mean' stays)",
    },
    # torch.compile: a few seconds of compilation each; one compiled check per module stays in the default run
    "test_model_fused_head.py": {
        "test_compiled_fused_head_equals_eager_and_does_not_recompile[*]": "torch.compile, 9 s each",
    },
    "test_model.py": {
        "test_compiled_training_step_does_not_recompile[random]": "torch.compile ([topk] stays)",
    },
    "test_reference.py": {
        "test_compiled_model_step_does_not_recompile[importance]": "torch.compile ([sampled] stays)",
    },
    "test_sampling.py": {
        "test_importance_weighted_gradient_is_unbiased": "statistical check over many draws, 4 s",
    },
    "test_step_count.py": {
        "test_compiled_model_follows_a_write_from_the_next_step_on": "torch.compile of a CGGRModel step, 22 s",
    },
    # two processes over gloo (torchrun): ~20 s each
    "test_distributed.py": {
        "test_global_selection_over_ddp_equals_one_process_on_the_concatenated_batch": "2 processes, 23 s",
        "test_global_random_selection_without_a_common_seed_and_layout_checks": "2 processes, 22 s",
        "test_fsdp2_router_cggr_model_and_fused_head_match_the_unsharded_model": "2 processes, 22 s",
        "test_ddp_seed_none_random_selection_follows_the_broadcast_seed_and_resumes": "2 processes, 20 s",
        "test_accelerate_prepare_and_train_with_gradient_accumulation": "2 processes, 20 s",
    },
    "test_readme_distributed.py": {
        "test_readme_distributed_command_runs": "the README's torchrun / accelerate command, 2 processes, 15-17 s each",
    },
}


def _matches(pattern: str, name: str) -> bool:
    """``*`` matches anything, everything else itself (brackets included: they delimit the parametrisation)."""
    return re.fullmatch(".*".join(map(re.escape, pattern.split("*"))), name) is not None


def _check_slow_table(items) -> None:
    modules = {item.path.name: item.module for item in items if getattr(item, "module", None) is not None}
    for file, patterns in SLOW.items():
        module = modules.get(file)
        if module is None:
            continue
        names = [n for n in vars(module) if n.startswith("test")]
        for pattern in patterns:
            base = pattern.split("[", 1)[0]
            if not any(_matches(base, n) for n in names):
                raise pytest.UsageError(f"tests/conftest.py SLOW names {file}::{pattern}, which the module does not "
                                        "define: update the table")


def pytest_collection_modifyitems(config, items):
    _check_slow_table(items)
    slow = pytest.mark.slow
    slow_run = config.getoption("markexpr") == "slow"
    for item in items:
        patterns = SLOW.get(item.path.name, {})
        function = getattr(item, "originalname", item.name)  # without the parametrisation
        if any(_matches(p, item.name if "[" in p else function) for p in patterns):
            item.add_marker(slow)
        elif function == "test_in_fresh_process" and slow_run:
            # (compiled kernels: a GPU machine) it re-runs its module's selected tests in a new process, with the
            # parent's -m: it belongs to the quick run and to the slow one
            item.add_marker(slow)


NO_CUDA = "CUDA-only test (tests/gpu/, marker cuda): this machine has no CUDA GPU"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Skip a ``cuda`` test on a machine without a CUDA GPU, before its fixtures run. Raised here rather than as
    a skip mark on each test, so that ``-rs`` / ``-ra`` fold the hundreds of them into one line (a mark reports
    each test's own location: one line per test function)."""
    if "cuda" in item.keywords and not torch.cuda.is_available():
        pytest.skip(NO_CUDA)
