"""Clean-label poisoning on the bundled digits: FeatureCollision and LabelConsistentBackdoor against the defences.

- ``transfer``: Poison Frogs' own setting. SmallCNN trained on the clean digits; for each of 20
  test targets (not of the base class 0), FeatureCollision crafts 25 poisons against its features,
  and a new linear head is trained on the frozen features of the clean set plus those poisons.
  Success: the target is then classified as 0. At eps 0.25, 0.5 and 1.0 (no bound). Deep k-NN on
  the frozen features: its F1, and the targets taken once the head is retrained without its flags.
- End to end: SmallCNN (Adam 3e-3, batch 64, 40 epochs) trained from scratch on the poisoned set,
  the drill crafting against a SmallCNN of its own (another initialization, so poisons must transfer).
  ``feature collision``: 5 targets per seed, 20 poisons each, eps 0.5. ``label-consistent backdoor``:
  every training 0 gets a copy perturbed by PGD-10 at eps 0.3 (and 0.5) with the 2x2 trigger. ``clean``: no drill.
  Defences: none, PoisonFilter (``filter=default``), PGD-7 adversarial training (eps 0.1), weight
  decay 5e-4, mixup (alpha 1), label smoothing 0.1. The no-defence rows also audit the trained model
  with Deep k-NN (KNNLabelConsistency) and spectral signatures alone: their detection F1.
- ``crafting``: seconds to craft the same poisons as ART 1.20's FeatureCollisionAttack (5 poisons
  for 1 target, 200 steps) and PoisoningAttackCleanLabelBackdoor (PGD-10 on half the training 0s),
  against the same trained SmallCNN, on the CPU with one thread.

    pip install -e ".[bench]" adversarial-robustness-toolbox
    python benchmarks/clean_label.py            # 3 seeds, every part; writes docs/pages/clean-label.md
    python benchmarks/clean_label.py --parts transfer crafting --seeds 0 --no-doc
    python benchmarks/clean_label.py --save a.json ...; python benchmarks/clean_label.py --merge a.json b.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from common import SCRATCH, load, mean, publish, quiet, save, trainer
from filtering import filter_group, warm_up
from torch import nn

from robust_lightning import RobustDataModule, audit
from robust_lightning.callbacks import AdversarialTraining, Mixup, PoisonFilter
from robust_lightning.data import DigitsDataModule
from robust_lightning.detectors import KNNLabelConsistency, Signals, SpectralSignatures, detection_quality
from robust_lightning.models import SmallCNN
from robust_lightning.poison import FeatureCollision, LabelConsistentBackdoor
from robust_lightning.poison.surrogate import train_surrogate

BASE, COUNT, FC_EPS, LC_EPS, EPOCHS = 0, 20, 0.5, 0.3, 40
TRANSFER_EPS, TRANSFER_COUNT, TRANSFER_TARGETS = (0.25, 0.5, 1.0), 25, 20
# Deep k-NN (Peri et al. 2020) as KNNLabelConsistency: the package's default (k 10, flag under 20%
# agreement) and the paper's rule (plurality vote, k above the poisons per target).
DEEP_KNN = {"knn": KNNLabelConsistency(k=10, agreement=0.2), "knn_paper": KNNLabelConsistency(k=50, agreement=None)}
DEFENCES = ("none", "filter", "adversarial training", "weight decay", "mixup", "label smoothing")
SCENARIOS = ("clean", "feature collision", "label-consistent backdoor", "label-consistent backdoor, eps 0.5")
DOC = Path(__file__).resolve().parents[1] / "docs" / "pages" / "clean-label.md"
MARKS = {part: f"<!-- clean-label {part} table -->" for part in ("transfer", "end to end", "crafting")}


def digits(seed: int) -> tuple[DigitsDataModule, torch.Tensor, torch.Tensor]:
    data = DigitsDataModule(seed=seed)
    data.setup("fit")
    return data, *data.train_set.tensors


def targets_for(data: DigitsDataModule, seed: int, count: int) -> list[int]:
    """``count`` test ids not of the base class, drawn by ``seed``."""
    others = (data.test_set.tensors[1] != BASE).nonzero().flatten()
    return others[torch.randperm(len(others), generator=torch.Generator().manual_seed(seed))[:count]].tolist()


def drill(scenario: str, seed: int, data: DigitsDataModule, surrogate: SmallCNN):
    if scenario == "feature collision":
        ids = targets_for(data, seed, 5)
        return FeatureCollision(ids, BASE, COUNT, data.test_set, eps=FC_EPS, features=surrogate.features, seed=seed)
    if scenario.startswith("label-consistent backdoor"):
        eps = 0.5 if scenario.endswith("eps 0.5") else LC_EPS
        return LabelConsistentBackdoor(target=BASE, rate=1.0, eps=eps, model=surrogate, seed=seed)
    return None


def defence(name: str) -> tuple[dict, list]:
    """SmallCNN's settings and the callbacks of one defence."""
    if name == "filter":
        return {}, filter_group("default")
    if name == "adversarial training":
        return {}, [AdversarialTraining(attack="pgd", eps=0.1, steps=7)]
    if name == "weight decay":
        return {"weight_decay": 5e-4}, []
    if name == "mixup":
        return {}, [Mixup(alpha=1.0)]
    if name == "label smoothing":
        return {"criterion": nn.CrossEntropyLoss(label_smoothing=0.1)}, []
    return {}, []


def end_to_end(scenario: str, name: str, seed: int, surrogate: SmallCNN) -> dict:
    base_data = DigitsDataModule(seed=seed)
    base_data.setup("fit")
    poison = drill(scenario, seed, base_data, surrogate)
    settings, callbacks = defence(name)
    pl.seed_everything(seed, verbose=False)
    data = RobustDataModule(base_data, poison=poison, seed=seed)
    model = SmallCNN(**settings)
    start = time.perf_counter()
    trainer(EPOCHS, callbacks).fit(model, datamodule=data)
    row = {"seconds": time.perf_counter() - start, **scores(model, poison, base_data)}
    flags = [c.flags for c in callbacks if isinstance(c, PoisonFilter)]
    if flags and poison is not None:
        row["f1"] = detection_quality(flags[0], data.poison_mask)["f1"]
    if name == "none" and poison is not None:
        for key, detector in (
            ("knn_f1", KNNLabelConsistency(k=10, agreement=0.2)),
            ("spectral_f1", SpectralSignatures(z=5.0)),
        ):
            row[key] = audit(model, data, detectors=[detector], accelerator="cpu").quality["f1"]
    return row


@torch.no_grad()
def scores(model: SmallCNN, poison, data: DigitsDataModule) -> dict:
    model.eval()
    x, y = data.test_set.tensors
    row = {"acc": float((model(x).argmax(1) == y).float().mean())}
    if isinstance(poison, FeatureCollision):
        row["asr"] = poison.attack_success_rate(model)
    elif isinstance(poison, LabelConsistentBackdoor):
        row["asr"] = poison.attack_success_rate(model, data.test_set)
    return row


def transfer(seed: int, eps: float, victim: SmallCNN, x: torch.Tensor, y: torch.Tensor, data) -> dict:
    """Poison Frogs' transfer setting, one target at a time: the share of targets taken for the base class.

    Also how far the poisons got (the feature distance to their target left over, a share of the
    bases' own; their L2 change, a share of the bases' norm), and Deep k-NN on the frozen features,
    at this package's default and at the paper's rule: what it flags, and the attack once the head
    is retrained without the flagged samples.
    """
    with torch.no_grad():
        clean = victim.features(x)
    rows = []
    for target in targets_for(data, seed, TRANSFER_TARGETS):
        fc = FeatureCollision(
            [target], BASE, TRANSFER_COUNT, data.test_set, eps=eps, features=victim.features, seed=seed
        )
        added = fc.inject(lambda ids: x[ids], y, 10)
        bases = x[added.sources]
        with torch.no_grad():
            poisoned, goal = victim.features(added.inputs), victim.features(fc.target_inputs)
            gap = (poisoned - goal).norm(dim=1).mean() / (victim.features(bases) - goal).norm(dim=1).mean()
        change = (added.inputs - bases).flatten(1).norm(dim=1).mean() / bases.flatten(1).norm(dim=1).mean()
        features, labels = torch.cat([clean, poisoned]), torch.cat([y, added.labels])
        row = {"gap": float(gap), "change": float(change), "asr": taken(features, labels, goal, seed)}
        truth = torch.arange(len(labels)) >= len(y)
        for name, detector in DEEP_KNN.items():
            flags = detector(Signals(labels, 10, features=features)).flags
            row[f"{name}_f1"] = detection_quality(flags, truth)["f1"]
            row[f"{name}_asr"] = taken(features[~flags], labels[~flags], goal, seed)
        rows.append(row)
    return {key: sum(row[key] for row in rows) / len(rows) for key in rows[0]}


def taken(features: torch.Tensor, labels: torch.Tensor, goal: torch.Tensor, seed: int) -> float:
    """1 when a linear head trained on these features takes the target's features for the base class."""
    head = fit_head(features, labels, seed)
    with torch.no_grad():
        return float(head(goal).argmax(1) == BASE)


def fit_head(features: torch.Tensor, labels: torch.Tensor, seed: int, steps: int = 300) -> nn.Linear:
    """A new linear head on frozen features: full-batch Adam, as the transfer setting retrains it."""
    torch.manual_seed(seed)
    head = nn.Linear(features.shape[1], 10)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(head(features), labels).backward()
        optimizer.step()
    return head


def crafting(seed: int, victim: SmallCNN, x: torch.Tensor, y: torch.Tensor, data) -> dict:
    """Seconds for this package's drills and ART's attacks to craft the same poisons against ``victim``."""
    ids = targets_for(data, seed, 1)  # one target, 5 poisons: ART takes minutes per 20
    fc = FeatureCollision(ids, BASE, 5, data.test_set, eps=FC_EPS, features=victim.features, seed=seed)
    # Half the 0s: ART's pp_poison must lie below 1.
    lc = LabelConsistentBackdoor(target=BASE, rate=0.5, eps=LC_EPS, model=victim, seed=seed)
    row = {}
    for key, attack in (("fc", fc), ("lc", lc)):
        start = time.perf_counter()
        added = attack.inject(lambda i: x[i], y, 10)
        row[f"{key}_ours"], row[f"{key}_poisons"] = time.perf_counter() - start, len(added.labels)
    row["fc_art"] = art_feature_collision(victim, fc, x[fc.inject(lambda i: x[i], y, 10).sources].numpy())
    row["lc_art"] = art_clean_label_backdoor(victim, x.numpy(), y.numpy())
    return row


def art_classifier(victim: SmallCNN):
    from art.estimators.classification import PyTorchClassifier

    model = nn.Sequential(victim.features, victim.head).eval()
    return PyTorchClassifier(model, nn.CrossEntropyLoss(), input_shape=(1, 8, 8), nb_classes=10, clip_values=(0, 1))


def art_feature_collision(victim: SmallCNN, fc: FeatureCollision, bases: np.ndarray) -> float:
    """ART's FeatureCollisionAttack, one object per target (its interface), 200 iterations like the drill.

    With the drill's weight of the distance to the base (ART's default, 256, keeps the poisons on
    their bases here) and the step that closed the most feature distance of 1.0, 0.1 and 0.01.
    """
    from art.attacks.poisoning import FeatureCollisionAttack

    classifier = art_classifier(victim)
    start = time.perf_counter()
    for k, target in enumerate(fc.target_inputs.numpy()):
        attack = FeatureCollisionAttack(
            classifier,
            target[None],
            feature_layer=0,
            max_iter=fc.steps,
            learning_rate=0.1,
            similarity_coeff=fc.beta,
            verbose=False,
        )
        attack.poison(bases[k * fc.count : (k + 1) * fc.count])
    return time.perf_counter() - start


def stamp(x: np.ndarray) -> np.ndarray:
    out = x.copy()
    out[..., -2:, -2:] = 1.0
    return out


def art_clean_label_backdoor(victim: SmallCNN, x: np.ndarray, y: np.ndarray) -> float:
    """ART's PoisoningAttackCleanLabelBackdoor with the drill's PGD (10 steps of 2.5 eps / 10) and trigger."""
    from art.attacks.poisoning import PoisoningAttackBackdoor, PoisoningAttackCleanLabelBackdoor

    attack = PoisoningAttackCleanLabelBackdoor(
        PoisoningAttackBackdoor(stamp),
        art_classifier(victim),
        target=np.eye(10)[BASE],
        pp_poison=0.5,
        eps=LC_EPS,
        eps_step=2.5 * LC_EPS / 10,
        max_iter=10,
    )
    start = time.perf_counter()
    attack.poison(x, np.eye(10)[y])
    return time.perf_counter() - start


def run_seed(seed: int, parts: list[str], results: dict, scenarios=SCENARIOS, defences=DEFENCES) -> None:
    data, x, y = digits(seed)
    surrogate = train_surrogate(x, y, 10, seed + 1000)  # the attacker's own model, not the victim's initialization
    if "transfer" in parts or "crafting" in parts:
        victim = train_surrogate(x, y, 10, seed)  # the trained network whose features the transfer victim keeps
    if "transfer" in parts:
        for eps in TRANSFER_EPS:
            results.setdefault(("transfer", f"eps {eps}"), []).append(transfer(seed, eps, victim, x, y, data))
            print("transfer", eps, seed, results[("transfer", f"eps {eps}")][-1], flush=True)
    if "crafting" in parts:
        results.setdefault(("crafting", "-"), []).append(crafting(seed, victim, x, y, data))
        print("crafting", seed, results[("crafting", "-")][-1], flush=True)
    if "end to end" in parts:
        for scenario in scenarios:
            for name in defences if seed % 2 == 0 else defences[::-1]:
                row = end_to_end(scenario, name, seed, surrogate)
                results.setdefault((scenario, name), []).append(row)
                print(scenario, name, seed, {k: round(v, 4) for k, v in row.items()}, flush=True)


def cell(value: float | None, percent: bool = True) -> str:
    if value is None:
        return "—"
    return f"{100 * value:.1f}%" if percent else f"{value:.2f}"


TRANSFER_HEADER = (
    (
        "| eps | targets taken (no defence) | feature distance left | input change (L2) "
        "| Deep k-NN k 10, 20%: F1 / taken | Deep k-NN k 50, plurality: F1 / taken |"
    ),
    "|---|---|---|---|---|---|",
)


def tables(results: dict, seeds: list[int]) -> dict[str, str]:
    means = f"Means over seeds {seeds}."
    transfer_rows = [
        f"| {eps.split()[1]} | {cell(mean(rows, 'asr'))} | {cell(mean(rows, 'gap'))} | {cell(mean(rows, 'change'))} | "
        f"{cell(mean(rows, 'knn_f1'), False)} / {cell(mean(rows, 'knn_asr'))} | "
        f"{cell(mean(rows, 'knn_paper_f1'), False)} / {cell(mean(rows, 'knn_paper_asr'))} |"
        for (part, eps), rows in results.items()
        if part == "transfer"
    ]
    end_rows = [
        f"| {scenario} | {name} | {cell(mean(rows, 'asr'))} | {cell(mean(rows, 'acc'))} | "
        f"{cell(mean(rows, 'f1'), False)} | {cell(mean(rows, 'knn_f1'), False)} | {cell(mean(rows, 'spectral_f1'), False)} |"
        for (scenario, name), rows in results.items()
        if scenario in SCENARIOS
    ]
    craft = results.get(("crafting", "-"), [])
    craft_rows = [
        f"| {title} | {mean(craft, f'{key}_poisons'):.0f} | {mean(craft, f'{key}_ours'):.2f} s | "
        f"{mean(craft, f'{key}_art'):.2f} s | {mean(craft, f'{key}_art') / mean(craft, f'{key}_ours'):.0f}x |"
        for key, title in (("fc", "feature collision (200 steps)"), ("lc", "label-consistent backdoor (PGD-10)"))
        if craft
    ]
    return {
        "transfer": "\n".join([means, "", *TRANSFER_HEADER, *transfer_rows]),
        "end to end": "\n".join(
            [
                means,
                "",
                "| drill | defence | attack success | test acc | filter F1 | Deep k-NN F1 | spectral F1 |",
                "|---|---|---|---|---|---|---|",
                *end_rows,
            ]
        ),
        "crafting": "\n".join(
            [means, "", "| attack | poisons | this package | ART | speed-up |", "|---|---|---|---|---|", *craft_rows]
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--parts", nargs="+", default=list(MARKS), choices=list(MARKS))
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    parser.add_argument("--defences", nargs="+", default=list(DEFENCES), choices=DEFENCES)
    parser.add_argument(
        "--no-doc", action="store_true", help="print the tables without writing docs/pages/clean-label.md"
    )
    parser.add_argument("--save", type=Path, help="also save the raw rows as JSON, to merge runs made in parallel")
    parser.add_argument("--merge", type=Path, nargs="+", help="render the tables from saved JSON files instead")
    args = parser.parse_args()
    if args.merge:
        results, seeds = load(args.merge)
    else:
        quiet()
        SCRATCH.mkdir(parents=True, exist_ok=True)
        warm_up()
        results, seeds = {}, args.seeds
        for seed in args.seeds:
            run_seed(seed, args.parts, results, args.scenarios, args.defences)
        if args.save:
            save(args.save, args.seeds, results)
    for part, text in tables(results, seeds).items():
        if part in args.parts or args.merge:
            publish(text, DOC, MARKS[part], args.no_doc)


if __name__ == "__main__":
    main()
