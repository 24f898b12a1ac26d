"""The benchmark plan: every record, group, split and query decided from the parameters alone (no pixels),
so a benchmark can be regenerated or a single query replayed cheaply."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from engine.scenes import SceneSpec, caption_of, pick, random_scene, seeded_rng, signature

KINDS: tuple[str, ...] = ("verbatim", "template", "crop", "composite", "texture", "novel")
KIND_WEIGHTS: tuple[float, ...] = (0.20, 0.15, 0.15, 0.15, 0.15, 0.20)
PROMPT_KINDS: tuple[str, ...] = ("verbatim", "paraphrase", "partial", "empty", "misleading")
PROMPT_WEIGHTS: tuple[float, ...] = (0.30, 0.20, 0.20, 0.15, 0.15)
SPLITS: tuple[str, ...] = ("tune", "test")

SOURCE_FRACTION = 0.83  # share of the corpus that are distinct source scenes
_DUP_EXTRA = (1, 2, 3)  # extra members per duplicate group (groups of 2-4)
_DUP_EXTRA_P = (0.55, 0.30, 0.15)

# Seed purposes for np.random.defaultseeded_rng([seed, ..., purpose]).
VERSION = 1  # of the generator: a change to any output bumps it

_P_CORPUS, _P_SCENE, _P_DUP, _P_CAPTION, _P_QPLAN, _P_QSEED = 1, 2, 3, 4, 5, 6
# Streams under a query's own seed.
_Q_IMAGE, _Q_PROMPT, _Q_CAPTION, _Q_NOVEL = 0, 1, 2, 3




@dataclass
class _Query:
    index: int
    query_id: str
    kind: str
    split: str
    prompt_kind: str
    groups: tuple[int, ...]  # source group A (and B for composites); () for novel
    member: int | None  # record (creation index) of group A whose caption is the verbatim prompt
    seed: int


@dataclass
class _Plan:
    train: int
    n_queries: int
    seed: int
    image_size: int
    specs: list[SceneSpec]  # per group
    members: list[list[int]]  # per group, records by creation index; the first is the pristine render
    rec_group: list[int]
    rec_id: list[str]
    rec_caption: list[str]
    group_split: list[str]
    signatures: set
    queries: list[_Query]

    def group_id(self, g: int) -> str:
        return f"g{g:05d}"


def _allocate(total: int, weights: Sequence[float]) -> list[int]:
    """Largest-remainder rounding of total * weights with every entry at least 1 (total >= len(weights))."""
    raw = [total * w / sum(weights) for w in weights]
    counts = [int(math.floor(x)) for x in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    for i in range(len(counts)):
        while counts[i] < 1:
            j = max(range(len(counts)), key=lambda k: (counts[k], -k))
            counts[j] -= 1
            counts[i] += 1
    return counts


class _Cycle:
    """Draws items without replacement, reshuffling when the list runs out."""

    def __init__(self, items: list[int], rng: np.random.Generator):
        self.items, self.rng, self.order, self.pos = items, rng, [], 0

    def next(self) -> int:
        if self.pos >= len(self.order):
            self.order = [self.items[int(i)] for i in self.rng.permutation(len(self.items))]
            self.pos = 0
        self.pos += 1
        return self.order[self.pos - 1]


def _make_plan(train: int, queries: int, seed: int, image_size: int) -> _Plan:
    rng = seeded_rng(seed, train, _P_CORPUS)
    n_groups = min(train - 1, max(2, int(round(train * SOURCE_FRACTION))))
    extras, left = [], train - n_groups
    while left > 0:
        k = min(left, int(rng.choice(_DUP_EXTRA, p=_DUP_EXTRA_P)))
        extras.append(k)
        left -= k
    n_extra = dict.fromkeys(range(n_groups), 0)
    for g, k in zip(rng.choice(n_groups, size=len(extras), replace=False), extras):
        n_extra[int(g)] = k

    specs = [random_scene(seeded_rng(seed, g, _P_SCENE)) for g in range(n_groups)]
    members: list[list[int]] = []
    rec_group: list[int] = []
    rec_caption: list[str] = []
    for g, spec in enumerate(specs):
        members.append([])
        for m in range(1 + n_extra[g]):
            c = len(rec_group)
            crng = seeded_rng(seed, c, _P_CAPTION)
            same = crng.random() < 0.35
            caption = rec_caption[members[g][0]] if m > 0 and same else caption_of(spec, crng)
            members[g].append(c)
            rec_group.append(g)
            rec_caption.append(caption)
    perm = rng.permutation(train)
    rec_id = [f"t{int(perm[c]):06d}" for c in range(train)]
    group_split = [""] * n_groups
    for rank, g in enumerate(rng.permutation(n_groups)):
        group_split[int(g)] = SPLITS[0] if rank < (n_groups + 1) // 2 else SPLITS[1]

    # Queries: kinds balanced across splits, prompt kinds independent of kinds.
    qrng = seeded_rng(seed, train, queries, _P_QPLAN)
    entries: list[tuple[str, str]] = []
    for kind, n in zip(KINDS, _allocate(queries, KIND_WEIGHTS)):
        n_tune = n // 2 + (int(qrng.integers(2)) if n % 2 else 0)
        entries += [(kind, SPLITS[0])] * n_tune + [(kind, SPLITS[1])] * (n - n_tune)
    entries = [entries[int(i)] for i in qrng.permutation(len(entries))]
    prompt_kinds = [pk for pk, n in zip(PROMPT_KINDS, _allocate(queries, PROMPT_WEIGHTS)) for _ in range(n)]
    prompt_kinds = [prompt_kinds[int(i)] for i in qrng.permutation(queries)]
    by_split = {s: [g for g in range(n_groups) if group_split[g] == s] for s in SPLITS}
    cycles = {s: _Cycle(by_split[s], qrng) for s in SPLITS}
    plan_queries = []
    for qi, ((kind, split), pk) in enumerate(zip(entries, prompt_kinds)):
        qseed = int(seeded_rng(seed, train, queries, qi, _P_QSEED).integers(0, 2**62))
        groups: tuple[int, ...] = ()
        member = None
        if kind != "novel":
            a = cycles[split].next()
            groups = (a,)
            if kind == "composite":
                groups = (a, pick(qrng, [g for g in by_split[split] if g != a]))
            member = members[a][int(qrng.integers(len(members[a])))]
        plan_queries.append(_Query(qi, f"q{qi:06d}", kind, split, pk, groups, member, qseed))
    return _Plan(train, queries, seed, image_size, specs, members, rec_group, rec_id, rec_caption, group_split,
                 {signature(s) for s in specs}, plan_queries)


