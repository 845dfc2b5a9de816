"""The parity report: run the ladder and print one table row per check.

``twinformer parity`` calls ``main``. Each row shows a check's worst tensor
pair; every failed pair follows on its own row with the worst element's index
and both values. The last line is ``parity: N passed, M failed``, counting
tensor pairs, and the exit status is 1 when any pair failed.

With ``--lora-rank 0`` the checks that need adapters are skipped and listed
as skipped; every other check still runs.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import math
import multiprocessing
import os
import sys
from typing import TYPE_CHECKING, Any

from twinformer import checkpoint
from twinformer.errors import ConfigError

if TYPE_CHECKING:
    from parity.ladder import Result

DTYPE_CHOICES = ("float64", "float32", "all")


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(
            f"must be >= 0 (0 skips the LoRA checks), got {value}"
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of ``twinformer parity``."""
    parser = argparse.ArgumentParser(
        prog="twinformer parity",
        description=(
            "Compare the PyTorch and JAX twins rung by rung on identical "
            "inputs and weights, and exit non-zero if any tensor pair "
            "exceeds its tolerance."
        ),
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="all",
        help="precision tier to run: float64, float32 or all (default: all)",
    )
    parser.add_argument(
        "--lora-rank",
        type=_non_negative_int,
        default=4,
        metavar="R",
        help="rank of the adapters in the LoRA checks; 0 skips them (default: 4)",
    )
    parser.add_argument(
        "--rung",
        type=int,
        action="append",
        choices=range(1, 11),
        metavar="N",
        help="run only rung N (1-10); repeat to run several (default: all)",
    )
    parser.add_argument(
        "--json",
        metavar="FILE",
        help="also write every result to FILE as JSON (written atomically)",
    )
    return parser


# XLA's CPU backend hands its code to LLVM at optimisation level 2 by default.
# The ladder's tensors are tiny, so its run time is mostly XLA compiling
# small functions, and level 0 roughly halves the command's wall time on two
# cores. HLO-level optimisation still runs, and the test suite runs the same
# checks at the default level.
FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"


def use_fast_compilation() -> None:
    """Add ``FAST_COMPILE_FLAG`` to XLA_FLAGS unless it already sets a level.

    XLA reads XLA_FLAGS once, when JAX starts its backends, so this must run
    first; afterwards it does nothing. Child processes inherit the variable.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" in flags or _jax_backends_started():
        return
    os.environ["XLA_FLAGS"] = f"{flags} {FAST_COMPILE_FLAG}".strip()


def enable_x64() -> None:
    """Turn on JAX's 64-bit types, before any JAX computation.

    Raises:
        ConfigError: JAX has already started without 64-bit types, so arrays
            made earlier would stay 32-bit.
    """
    import jax

    if jax.config.read("jax_enable_x64"):
        return
    if _jax_backends_started():
        raise ConfigError(
            "the float64 parity tier needs JAX's 64-bit types, but JAX has "
            "already started without them; set JAX_ENABLE_X64=1 before "
            "starting Python, or run with --dtype float32"
        )
    jax.config.update("jax_enable_x64", True)


def _jax_backends_started() -> bool:
    # NOTE: a private JAX function (present in jax 0.10.2); if it moves, the
    # check is skipped and x64 is switched on regardless.
    try:
        from jax._src.xla_bridge import backends_are_initialized
    except ImportError:
        return False
    return bool(backends_are_initialized())


def check_lora_rank(rank: int) -> None:
    """Raise LoraError when the ladder's model cannot take adapters of ``rank``."""
    if rank == 0:
        return
    from parity.ladder import LORA_ALPHA, ladder_model_config
    from twinformer.config import ALL_LINEAR, LoraConfig
    from twinformer.param_map import adapter_tensor_specs

    lora_config = LoraConfig(rank=rank, alpha=LORA_ALPHA, targets=(ALL_LINEAR,))
    adapter_tensor_specs(ladder_model_config(), lora_config)


def run_ladder(
    dtypes: tuple[str, ...],
    lora_rank: int,
    rungs: set[int] | None = None,
    parallel: bool = False,
) -> tuple[list[Result], list[tuple[int, str, str]]]:
    """Run the checks of the ladder for each dtype.

    Args:
        dtypes: "float64" and/or "float32".
        lora_rank: adapter rank of the LoRA checks; 0 skips them.
        rungs: the rungs to run; ``None`` runs all.
        parallel: run every dtype after the first in a child process, so
            that two tiers use two cores. Most of a tier's time is XLA
            compiling on one core.

    Returns:
        The results, and (rung, check, dtype) of every check skipped because
        ``lora_rank`` is 0, in the order of ``dtypes``.
    """
    if not parallel or len(dtypes) < 2:
        results: list[Result] = []
        skipped: list[tuple[int, str, str]] = []
        for dtype in dtypes:
            tier_results, tier_skipped = _run_tier(dtype, lora_rank, rungs, None)
            results += tier_results
            skipped += tier_skipped
        return results, skipped

    import jax

    x64 = bool(jax.config.read("jax_enable_x64"))
    # "spawn" starts a fresh interpreter: forking a process that has started
    # JAX's thread pools can deadlock.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=len(dtypes) - 1, mp_context=context
    ) as pool:
        futures = [
            pool.submit(_run_tier, dtype, lora_rank, rungs, x64) for dtype in dtypes[1:]
        ]
        results, skipped = _run_tier(dtypes[0], lora_rank, rungs, None)
        for future in futures:
            tier_results, tier_skipped = future.result()
            results += tier_results
            skipped += tier_skipped
    return results, skipped


def _run_tier(
    dtype: str, lora_rank: int, rungs: set[int] | None, x64: bool | None
) -> tuple[list[Result], list[tuple[int, str, str]]]:
    if x64 is not None:
        import jax

        # A child process must match the parent's x64 mode before computing.
        jax.config.update("jax_enable_x64", x64)
    from parity.ladder import CHECKS, Fixture, run_check

    results: list[Result] = []
    skipped: list[tuple[int, str, str]] = []
    fixture = Fixture(dtype, lora_rank)
    for check in CHECKS:
        if rungs is not None and check.rung not in rungs:
            continue
        if check.uses_lora and lora_rank == 0:
            skipped.append((check.rung, check.name, dtype))
            continue
        results += run_check(check, fixture, catch=True)
    return results, skipped


def _available_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _check_rows(results: list[Result]) -> list[list[str]]:
    # One row per (rung, check, dtype) with its worst pair, then its failures.
    groups: dict[tuple, list[Result]] = {}
    for result in results:
        groups.setdefault((result.rung, result.check, result.dtype), []).append(result)
    rows = []
    for (rung, check, dtype), group in groups.items():
        worst = max(group, key=lambda r: _sort_key(r))
        failed = [r for r in group if not r.passed]
        label = f"{check} [{dtype}], {len(group)} tensors, worst: {worst.tensor}"
        rows.append(_row(str(rung), label, worst, not failed))
        for result in failed:
            rows.append(_row("", f"  FAILED {result.tensor}: {result.detail}", result))
    return rows


def _sort_key(result: Result) -> tuple[bool, float]:
    ratio = result.max_rel / result.tolerance if result.tolerance else result.max_abs
    return (not result.passed, -math.inf if math.isnan(ratio) else ratio)


def _row(
    rung: str, label: str, result: Result, passed: bool | None = None
) -> list[str]:
    passed = result.passed if passed is None else passed
    return [
        rung,
        label,
        f"{result.max_abs:.2e}",
        f"{result.max_rel:.2e}",
        f"{result.tolerance:.0e}",
        "pass" if passed else "FAIL",
    ]


def format_table(results: list[Result], skipped: list[tuple[int, str, str]]) -> str:
    """Format the results as a text table, one row per check."""
    header = ["rung", "check", "max abs", "max rel", "tol", "result"]
    rows = _check_rows(results)
    rows += [[str(r), f"{c} [{d}]", "-", "-", "-", "skipped"] for r, c, d in skipped]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    widths[1] = min(widths[1], 90)
    lines = []
    for row in [header, *rows]:
        cells = [row[0].rjust(widths[0]), row[1].ljust(widths[1])]
        cells += [
            cell.rjust(width) for cell, width in zip(row[2:], widths[2:], strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _json_value(result: Result) -> dict[str, Any]:
    record = dataclasses.asdict(result)
    for key in ("max_abs", "max_rel"):
        if not math.isfinite(record[key]):
            record[key] = str(record[key])
    return record


def main(argv: list[str] | None = None) -> int:
    """Run the parity ladder and print the table.

    Args:
        argv: command-line arguments without the program name; ``None``
            reads ``sys.argv``.

    Returns:
        0 when every tensor pair is within tolerance, 1 otherwise.

    Raises:
        ConfigError: float64 requested after JAX started without x64.
        LoraError: a LoRA rank the ladder's model cannot take.
    """
    args = build_parser().parse_args(argv)
    use_fast_compilation()
    dtypes = ("float64", "float32") if args.dtype == "all" else (args.dtype,)
    if "float64" in dtypes:
        enable_x64()
    check_lora_rank(args.lora_rank)

    rungs = set(args.rung) if args.rung else None
    parallel = _available_cores() > 1
    results, skipped = run_ladder(dtypes, args.lora_rank, rungs, parallel)
    failed = sum(not result.passed for result in results)
    passed = len(results) - failed
    print(format_table(results, skipped))
    print(f"parity: {passed} passed, {failed} failed")
    if args.json:
        checkpoint.write_json(
            args.json,
            {
                "passed": passed,
                "failed": failed,
                "skipped": [list(entry) for entry in skipped],
                "results": [_json_value(result) for result in results],
            },
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
