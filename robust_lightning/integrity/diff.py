"""Compare two versions of a split sample by sample: what changed, what was added, removed or moved."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

_SHOWN = 10


@dataclass
class SplitDiff:
    """The differences between a split as recorded and as read now; ids are positions in the recorded split.

    Attributes:
        changed: ids whose input content differs (same place, new content).
        relabelled: ``(id, recorded label, current label)`` for samples whose input is unchanged.
        added: positions, in the current split, of samples the record does not hold.
        removed: ids of recorded samples that are gone.
        moved: ids whose place in the order changed, relative to the samples both versions hold.
    """

    changed: list[int] = field(default_factory=list)
    relabelled: list[tuple[int, int, int]] = field(default_factory=list)
    added: list[int] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)
    moved: list[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return any((self.changed, self.relabelled, self.added, self.removed, self.moved))

    def describe(self) -> list[str]:
        """One line per kind of change, each naming the ids."""
        lines = []
        if self.changed:
            lines.append(f"{len(self.changed)} changed: ids {_ids(self.changed)}")
        if self.relabelled:
            shown = ", ".join(f"{i} ({old} -> {new})" for i, old, new in self.relabelled[:_SHOWN])
            more = f" and {len(self.relabelled) - _SHOWN} more" if len(self.relabelled) > _SHOWN else ""
            lines.append(f"{len(self.relabelled)} relabelled: ids {shown}{more}")
        if self.added:
            lines.append(f"{len(self.added)} added: at positions {_ids(self.added)}")
        if self.removed:
            lines.append(f"{len(self.removed)} removed: ids {_ids(self.removed)}")
        if self.moved:
            lines.append(f"{len(self.moved)} moved: ids {_ids(self.moved)}")
        return lines


def _ids(ids: Sequence[int]) -> str:
    more = f" and {len(ids) - _SHOWN} more" if len(ids) > _SHOWN else ""
    return ", ".join(map(str, ids[:_SHOWN])) + more


def diff_split(recorded: Sequence[tuple[str, int]], current: Sequence[tuple[str, int]]) -> SplitDiff:
    """Match samples by the digest of their input, then report what differs.

    Each sample is ``(input digest, label)``. A sample keeps its id when its input is found
    again anywhere in the split, so one insertion or removal does not make every later sample
    look changed; a digest found at its recorded place is preferred, so duplicates stay put.

    Example:
        >>> recorded = [("a", 0), ("b", 1), ("c", 2), ("d", 3)]
        >>> diff_split(recorded, [("a", 0), ("c", 2), ("b", 1), ("x", 3), ("e", 4)])
        SplitDiff(changed=[3], relabelled=[], added=[4], removed=[], moved=[1, 2])
        >>> diff_split(recorded, [("a", 0), ("b", 5), ("d", 3)])
        SplitDiff(changed=[], relabelled=[(1, 1, 5)], added=[], removed=[2], moved=[])
    """
    if list(recorded) == list(current):
        return SplitDiff()
    match = _match(recorded, current)
    diff = SplitDiff()
    unmatched_current = sorted(set(range(len(current))) - set(match.values()))
    unmatched_recorded = sorted(set(range(len(recorded))) - set(match))
    diff.changed = sorted(set(unmatched_recorded) & set(unmatched_current))
    diff.added = [j for j in unmatched_current if j not in diff.changed]
    diff.removed = [i for i in unmatched_recorded if i not in diff.changed]
    diff.relabelled = [
        (i, recorded[i][1], current[j][1]) for i, j in sorted(match.items()) if recorded[i][1] != current[j][1]
    ]
    # Ranks among the samples both versions hold, so that insertions and removals move nothing.
    in_record_order, in_current_order = sorted(match), sorted(match, key=match.__getitem__)
    diff.moved = [i for i, j in zip(in_record_order, in_current_order) if i != j]
    return diff


def _match(recorded: Sequence[tuple[str, int]], current: Sequence[tuple[str, int]]) -> dict[int, int]:
    """Recorded id -> current position: a sample's own place first, then equal (digest, label), then equal digest."""
    match = {i: i for i in range(min(len(recorded), len(current))) if recorded[i] == current[i]}
    for key in (lambda sample: sample, lambda sample: sample[0]):  # exact sample first, then input alone
        free: dict = defaultdict(list)
        for i, sample in enumerate(recorded):
            if i not in match:
                free[key(sample)].append(i)
        taken = set(match.values())
        for j, sample in enumerate(current):
            if j not in taken and free.get(key(sample)):
                match[free[key(sample)].pop(0)] = j
    return match
