"""Adversarial training on the bundled digits: the callback against the same method written by hand.

Side by side, with the same SmallCNN (Adam 3e-3, batch 64, 40 epochs), data, eps = 0.1 and steps:
- ``callback``: AdversarialTraining on the unmodified SmallCNN;
- ``lightning``: the same method written inside a LightningModule's ``training_step``;
- ``loop``: a plain PyTorch loop;
- ``art``: ART's AdversarialTrainerMadryPGD (PGD-7 only), when the ``bench`` extra is installed.
The loop validates every epoch, as the Lightning runs do. Time ratios come from alternating
callback/lightning pairs (one seed per pair, which of the two runs first alternating too; the loop
runs the same seeds, ART the first). Robust accuracy
is PGD-20 (eps 0.1, step eps/4, random start) on the test split; AutoAttack (standard, L-inf)
for the first seed's callback and loop models.

    python benchmarks/adversarial.py                      # 5 pairs, all methods; writes docs/pages/adversarial.md
    python benchmarks/adversarial.py --methods fgsm_rs --pairs 2 --no-doc
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import torchattacks
from common import load, publish, quiet, save, trainer
from torch import nn

from robust_lightning.callbacks import AdversarialTraining
from robust_lightning.data import DigitsDataModule
from robust_lightning.models import SmallCNN

EPS, EPOCHS, BETA = 0.1, 40, 6.0
METHODS = {"fgsm_rs": ("fgsm_rs", 1), "pgd7": ("pgd", 7), "trades": ("trades", 7)}
DOC = Path(__file__).resolve().parents[1] / "docs" / "pages" / "adversarial.md"
MARK = "<!-- adversarial benchmark table -->"


def attack_of(model: nn.Module, method: str) -> torchattacks.attack.Attack:
    """The training attack, as a hand-written version would build it."""
    if method == "fgsm_rs":
        return torchattacks.FFGSM(model, eps=EPS, alpha=1.25 * EPS)
    if method == "pgd7":
        return torchattacks.PGD(model, eps=EPS, alpha=EPS / 4, steps=7)
    return torchattacks.TPGD(model, eps=EPS, alpha=EPS / 4, steps=7)


def adversarial_loss(model: nn.Module, method: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One step's loss, written out by hand: the attack in eval mode, then the method's objective."""
    model.eval()
    adversarial = attack_of(model, method)(x, y)
    model.train()
    if method != "trades":
        return nn.functional.cross_entropy(model(adversarial), y)
    logits = model(x)
    kl = nn.functional.kl_div(model(adversarial).log_softmax(1), logits.softmax(1), reduction="batchmean")
    return nn.functional.cross_entropy(logits, y) + BETA * kl


class HandWritten(SmallCNN):
    """SmallCNN with the method written inside training_step, as a user would without the callback."""

    def __init__(self, method: str) -> None:
        super().__init__()
        self.method = method

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = adversarial_loss(self, self.method, x, y)
        self.log("train/loss", loss)
        return loss


def run_callback(method: str, seed: int) -> tuple[nn.Module, float]:
    pl.seed_everything(seed, verbose=False)
    model = SmallCNN()
    attack, steps = METHODS[method]
    start = time.perf_counter()
    trainer(EPOCHS, [AdversarialTraining(attack, eps=EPS, steps=steps, beta=BETA)]).fit(
        model, datamodule=DigitsDataModule()
    )
    return model, time.perf_counter() - start


def run_lightning(method: str, seed: int) -> tuple[nn.Module, float]:
    pl.seed_everything(seed, verbose=False)
    model = HandWritten(method)
    start = time.perf_counter()
    trainer(EPOCHS).fit(model, datamodule=DigitsDataModule())
    return model, time.perf_counter() - start


def run_loop(method: str, seed: int) -> tuple[nn.Module, float]:
    pl.seed_everything(seed, verbose=False)
    model, data = SmallCNN(), DigitsDataModule()
    data.setup("fit")
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    start = time.perf_counter()
    validate(model, data, batches=2)  # Lightning's sanity check
    for _ in range(EPOCHS):
        model.train()
        for x, y in data.train_dataloader():
            optimizer.zero_grad()
            adversarial_loss(model, method, x, y).backward()
            optimizer.step()
        validate(model, data)
    return model, time.perf_counter() - start


@torch.no_grad()
def validate(model: nn.Module, data: DigitsDataModule, batches: int | None = None) -> float:
    model.eval()
    pairs = [(model(x).argmax(1) == y) for x, y in itertools.islice(data.val_dataloader(), batches)]
    return float(torch.cat(pairs).float().mean())


def run_art(method: str, seed: int) -> tuple[nn.Module, float]:
    from art.defences.trainer import AdversarialTrainerMadryPGD
    from art.estimators.classification import PyTorchClassifier

    pl.seed_everything(seed, verbose=False)
    model, data = SmallCNN(), DigitsDataModule()
    data.setup("fit")
    x, y = data.train_set.tensors
    net = nn.Sequential(model.features, model.head)
    classifier = PyTorchClassifier(
        net,
        nn.CrossEntropyLoss(),
        (1, 8, 8),
        10,
        optimizer=torch.optim.Adam(net.parameters(), lr=3e-3),
        clip_values=(0, 1),
    )
    start = time.perf_counter()
    AdversarialTrainerMadryPGD(classifier, nb_epochs=EPOCHS, batch_size=64, eps=EPS, eps_step=EPS / 4, max_iter=7).fit(
        x.numpy(), y.numpy()
    )
    return model, time.perf_counter() - start


def evaluate(model: nn.Module, autoattack: bool) -> dict[str, float]:
    data = DigitsDataModule()
    data.setup("test")
    x, y = data.test_set.tensors
    model.eval()
    row = {"clean": accuracy(model, x, y)}
    row["pgd20"] = accuracy(model, torchattacks.PGD(model, eps=EPS, alpha=EPS / 4, steps=20)(x, y), y)
    if autoattack:
        row["autoattack"] = accuracy(model, torchattacks.AutoAttack(model, eps=EPS, n_classes=10, seed=0)(x, y), y)
    return row


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(1) == y).float().mean())


RUNNERS = {"callback": run_callback, "lightning": run_lightning, "loop": run_loop, "art": run_art}


def table(results: dict[tuple[str, str], list[dict]], seeds: list[int]) -> str:
    lines = [
        (
            f"Seeds among {seeds}: callback and lightning alternate, one pair per seed, and the loop runs the same "
            "seeds (the runs column); accuracy in %, mean over seeds (AutoAttack: over the first seed of each batch "
            "of runs); time ratio: median over pairs of callback / lightning seconds, else mean seconds relative to "
            "lightning."
        ),
        "",
        "| method | implementation | runs | clean | PGD-20 | AutoAttack | seconds | time ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method in METHODS:
        for impl in RUNNERS:
            rows = results.get((method, impl))
            if not rows:
                continue
            cells = [_mean(rows, key) for key in ("clean", "pgd20", "autoattack")]
            seconds = statistics.fmean(r["seconds"] for r in rows)
            lines.append(
                f"| {method} | {impl} | {len(rows)} | "
                + " | ".join(cells)
                + f" | {seconds:.0f} | {_ratio(results, method, impl)} |"
            )
    return "\n".join(lines)


def _mean(rows: list[dict], key: str) -> str:
    values = [100 * r[key] for r in rows if key in r]
    return f"{statistics.fmean(values):.1f}" if values else "—"


def _ratio(results, method: str, impl: str) -> str:
    base = results.get((method, "lightning"))
    if not base or impl == "lightning":
        return "1.00" if impl == "lightning" else "—"
    rows = results[(method, impl)]
    if impl == "callback":
        return f"{statistics.median(r['seconds'] / b['seconds'] for r, b in zip(rows, base, strict=False)):.3f}"
    return f"{statistics.fmean(r['seconds'] for r in rows) / statistics.fmean(b['seconds'] for b in base):.2f}"


def _pair_swapped(impls: list[str]) -> list[str]:
    """``impls`` with callback and lightning, when both run, in each other's place."""
    swap = {"callback": "lightning", "lightning": "callback"} if {"callback", "lightning"} <= set(impls) else {}
    return [swap.get(impl, impl) for impl in impls]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=5, help="alternating callback/lightning pairs, one seed each")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds run from here, to add pairs to saved runs")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--impls", nargs="+", default=list(RUNNERS), choices=list(RUNNERS))
    parser.add_argument("--no-doc", action="store_true")
    parser.add_argument("--save", type=Path)
    parser.add_argument("--merge", type=Path, nargs="+")
    args = parser.parse_args()
    if args.merge:
        results, seeds = load(args.merge)
        return publish(table(results, seeds), DOC, MARK, args.no_doc)
    quiet()
    results: dict[tuple[str, str], list[dict]] = {}
    seeds = list(range(args.first_seed, args.first_seed + args.pairs))
    for method in args.methods:
        for seed in seeds:
            # Which of a pair runs first alternates, so that neither always meets the machine as the other left it.
            for impl in args.impls if seed % 2 == 0 else _pair_swapped(args.impls):
                if impl == "art" and (method != "pgd7" or seed > seeds[0]):
                    continue  # a reference for PGD-7: one run
                try:
                    model, seconds = RUNNERS[impl](method, seed)
                except ImportError:
                    continue  # ART not installed
                autoattack = seed == seeds[0] and impl in ("callback", "loop")
                row = {"seed": seed, "seconds": seconds, **evaluate(model, autoattack=autoattack)}
                results.setdefault((method, impl), []).append(row)
                print(method, impl, seed, {k: round(v, 4) for k, v in row.items()}, flush=True)
    if args.save:
        save(args.save, seeds, results)
    publish(table(results, seeds), DOC, MARK, args.no_doc)


if __name__ == "__main__":
    main()
