"""The filter at scale: one detection round per detector at N = 10k to 1M, and training end to end at 100k.

Detection: each detector runs in a process of its own, on the same seeded signals: D = 128
features, P = 784 inputs, 10,000 trusted reference samples, 10 classes, 40% of the 4s and 8s (and
of the 6s and 9s) flipped into each other. Time is wall time of the one call; memory is the peak
resident memory during the call above the memory held once the signals are built (Linux's VmHWM,
reset first).

End to end: 100k 28x28 digits, made offline by upsampling and warping the bundled ones, pair flip
40%, trained with the recipes' filter (``filter=default``) and without (``filter=none``), for two
models: the recipes' SmallCNN and a BatchNorm CNN.

    python benchmarks/scale.py                      # N = 10k, 100k, 1M; writes docs/pages/scale.md and its plot
    python benchmarks/scale.py --sizes 10000 --no-doc
    python benchmarks/scale.py --end-to-end         # 100k samples, both models; writes docs/pages/scale.md
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import publish

from robust_lightning.detectors import (
    InputSpectralSignatures,
    KNNLabelConsistency,
    LinearProbe,
    NearDuplicates,
    Signals,
    SpectralSignatures,
)

DETECTORS = {
    "LinearProbe (screen)": LinearProbe(ridge=10.0),
    "SpectralSignatures (screen z=3, confirm z=5)": SpectralSignatures(z=3.0),
    "InputSpectralSignatures (screen, confirm)": InputSpectralSignatures(),
    "KNNLabelConsistency (confirm)": KNNLabelConsistency(k=10, agreement=0.2),
    "NearDuplicates": NearDuplicates(),
}
SIZES = (10_000, 100_000, 1_000_000)
FEATURES, INPUTS, REFERENCE, CLASSES = 128, 784, 10_000, 10
FLIPS = {4: 8, 8: 4, 6: 9, 9: 6}
DOCS = Path(__file__).resolve().parents[1] / "docs" / "pages"
MARK = "<!-- scale benchmark table -->"
END_TO_END_MARK = "<!-- end-to-end scale table -->"


def synthetic(n: int, seed: int = 0) -> tuple[Signals, torch.Tensor]:
    """Signals of ``n`` training samples with clustered classes, and the mask of flipped labels."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(CLASSES, FEATURES, generator=g) * 2
    pixels = torch.rand(CLASSES, INPUTS, generator=g)

    def draw(count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, CLASSES, (count,), generator=g)
        features = centres[labels] + torch.randn(count, FEATURES, generator=g)
        inputs = pixels[labels] + 0.3 * torch.randn(count, INPUTS, generator=g)
        return labels, features, inputs

    labels, features, inputs = draw(n)
    ref_labels, ref_features, ref_inputs = draw(REFERENCE)
    flipped = torch.zeros(n, dtype=torch.bool)
    for source, target in FLIPS.items():
        ids = (labels == source).nonzero().flatten()
        chosen = ids[torch.randperm(len(ids), generator=g)[: round(0.4 * len(ids))]]
        flipped[chosen] = True
    given = labels.clone()
    for source, target in FLIPS.items():
        given[flipped & (labels == source)] = target
    signals = Signals(
        given, CLASSES, features=features, inputs=inputs, reference_features=ref_features,
        reference_labels=ref_labels, reference_inputs=ref_inputs,
    )  # fmt: skip
    return signals, flipped


def _status(field: str) -> int:
    """A memory figure of this process from /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} is not in /proc/self/status")


def measure(name: str, n: int) -> dict:
    """Time and peak memory of one detector's round, in this process."""
    signals, flipped = synthetic(n)
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the memory held now
    held = _status("VmRSS")
    start = time.perf_counter()
    detection = DETECTORS[name](signals)
    seconds = time.perf_counter() - start
    hits = int((detection.flags & flipped).sum())
    return {
        "seconds": seconds,
        "peak_gb": (_status("VmHWM") - held) / 1e9,
        "flagged": int(detection.flags.sum()),
        "recall": hits / max(int(flipped.sum()), 1),
    }


def run(name: str, n: int) -> dict:
    """:func:`measure` in a fresh process, so that no detector inherits another's memory."""
    done = subprocess.run([sys.executable, __file__, "--one", name, str(n)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: dict[tuple[str, int], dict], sizes: list[int]) -> str:
    lines = [
        "| detector, one round | " + " | ".join(f"N = {n:,}" for n in sizes) + " | time growth, 10x N |",
        "|---" * (len(sizes) + 2) + "|",
    ]
    for name in DETECTORS:
        cells = [f"{results[name, n]['seconds']:.1f} s, {results[name, n]['peak_gb']:.2f} GB" for n in sizes]
        growth = [results[name, b]["seconds"] / results[name, a]["seconds"] for a, b in itertools.pairwise(sizes)]
        lines.append(f"| {name} | " + " | ".join(cells) + " | " + ", ".join(f"{g:.1f}x" for g in growth) + " |")
    threads = torch.get_num_threads()
    lines.append(
        f"\nSeconds and peak memory above the stored signals, one process per cell, {threads} threads "
        f"({_cpu()}). Command: `python benchmarks/scale.py`."
    )
    return "\n".join(lines)


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def plot(results: dict[tuple[str, int], dict], sizes: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    for name in DETECTORS:
        axes.loglog(sizes, [results[name, n]["seconds"] for n in sizes], marker="o", label=name)
    axes.loglog(sizes, [results[next(iter(DETECTORS)), sizes[0]]["seconds"] * n / sizes[0] for n in sizes],
                linestyle=":", color="grey", label="slope 1 (linear)")  # fmt: skip
    axes.set_xlabel("training samples N")
    axes.set_ylabel("seconds per round")
    axes.legend(fontsize=7)
    axes.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--no-doc", action="store_true", help="print the table without writing docs/pages/scale.md")
    parser.add_argument("--one", nargs=2, metavar=("DETECTOR", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--end-to-end", action="store_true", help="train at 100k samples with and without the filter")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument(
        "--size", type=int, default=28, help="image side of the end-to-end digits (8: the bundled size)"
    )
    parser.add_argument("--models", nargs="+", default=["SmallCNN", "BatchNormCNN"])
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]))))
        return
    if args.end_to_end:
        from end_to_end import run_end_to_end

        return publish(
            run_end_to_end(args.models, args.epochs, args.size), DOCS / "scale.md", END_TO_END_MARK, args.no_doc
        )
    results = {}
    for n in args.sizes:
        for name in DETECTORS:
            results[name, n] = run(name, n)
            print(name, n, {k: round(v, 3) for k, v in results[name, n].items()}, flush=True)
    if not args.no_doc:
        plot(results, args.sizes, DOCS / "images" / "scale.png")
    publish(table(results, args.sizes), DOCS / "scale.md", MARK, args.no_doc)


if __name__ == "__main__":
    main()
