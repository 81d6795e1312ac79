"""A/B timing for the benchmarks: two variants called in interleaved rounds, in one process."""
import statistics
import time


def paired(variants: dict, rounds: int, warmup: int = 3) -> dict:
    """variants: {label: fn()} (two of them). Each round calls every fn once, in turn; returns per label the
    median and IQR in ms, and the median and IQR of the per-round ratio first / second."""
    times = {label: [] for label in variants}
    for r in range(warmup + rounds):
        for label, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            if r >= warmup:
                times[label].append((time.perf_counter() - t0) * 1e3)
    first, second = times.values()
    ratios = [a / b for a, b in zip(first, second)]
    q = lambda v: statistics.quantiles(v, n=4)  # noqa: E731
    row = {label: {"median_ms": statistics.median(v), "iqr_ms": [q(v)[0], q(v)[2]]} for label, v in times.items()}
    row["ratio_median"], row["ratio_iqr"] = statistics.median(ratios), [q(ratios)[0], q(ratios)[2]]
    return row


def line(row: dict) -> str:
    labels = [k for k in row if isinstance(row[k], dict)]
    parts = [f"{k} {row[k]['median_ms']:.1f} ms (IQR {row[k]['iqr_ms'][0]:.1f}-{row[k]['iqr_ms'][1]:.1f})"
             for k in labels]
    return (", ".join(parts) + f"; per-round ratio {row['ratio_median']:.3f} (IQR {row['ratio_iqr'][0]:.3f}-"
            f"{row['ratio_iqr'][1]:.3f})")
