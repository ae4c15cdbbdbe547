"""Are mirror images another class? Decided from data, before flip augmentation is used.

Flip augmentation teaches a model that an image and its mirror image are one class. Where classes are mirror images
of each other (keep-left / keep-right signs, left and right arrows) that is wrong: on gtsrb_finegrained ``--hflip 0``
gained 2.1 and 4.0 test points after two epochs of fine-tuning (seeds 0, 1), while the other three domains lost
validation accuracy without flips (AMD EPYC Zen 4, 2 cores, 2026-11-29; docs/training.md). Until now the user had to
know that.

The test: a probe fitted on un-mirrored features of half the training images predicts the mirrored images of the
other half (cross-fitted, so no image is scored by a probe that saw it). A pair of classes whose mirrored images
are mostly predicted as each other (class a's as b, b's as a) is a mirror pair; one such pair is enough to turn
flips off, because the augmentation would teach the model to confuse exactly those classes.

Frozen ImageNet lite0 features cannot tell: the probe finds no pair on any of the four domains, gtsrb included
(benchmarks/mirror.py, results/mirror.json, Intel Xeon, 2026-12-02, each way >= 50% then): a mirrored "dangerous curve
to the left" is still predicted as itself 83% of the time (50-74% with a 3x3 grid of the last maps instead of their
mean, AMD EPYC Zen 5, 2026-12-03). A network trained a few epochs without mirroring can: ``--mirror-check``
(engine/addons/mirror_check.py) asks it with :func:`pairs_from_answers`. On generated mirror-image classes that frozen
features do see (diagonal stripes, tests/test_mirror.py) the probe finds the pair.
"""

from __future__ import annotations

import torch

from finegrain.engine.probe import l2_normalise, logistic_regression

#: share of a pair's correctly recognised images whose mirror image goes to the other class, for a mirror pair. Why
#: not a half: a network cut-mixed from its first epoch knows left from right less after 3: on gtsrb_finegrained (AMD
#: EPYC Zen 4, seed 0, 36 epochs planned, 2026-12-07) keep right/left pooled 0.47, turn 0.38, go straight 0.32, the
#: strongest other candidate 0.11 (50/60 km/h); at 0.5 no pair was found, mirroring came on, test 85.7% against 94.2%
#: for the run before that found two pairs. A missed pair costs far more than a false one (a run without flips).
MIN_SHARE = 0.25
#: images of a class (recognised un-mirrored) below which it is not judged
MIN_IMAGES = 3


def mirror_pairs(plain: torch.Tensor, mirrored: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 c: float = 100.0) -> list[dict]:  # fmt: skip
    """Pairs of classes that are mirror images of each other, from features of the same images un-mirrored and
    mirrored, as :func:`pairs_from_answers` reports them (empty: flips are safe). ``c``: the probe's inverse
    penalty; 100 found the generated pair on 3 of 3 seeds, 1 on 1 of 3."""
    plain, mirrored = l2_normalise(plain.float()), l2_normalise(mirrored.float())
    fold = torch.arange(len(labels)) % 2
    as_plain, as_mirror = torch.empty_like(labels), torch.empty_like(labels)
    for k in (0, 1):
        fit, score = fold != k, fold == k
        w, b = logistic_regression(plain[fit], labels[fit], num_classes, c)
        as_plain[score] = (plain[score] @ w.T + b).argmax(1)
        as_mirror[score] = (mirrored[score] @ w.T + b).argmax(1)
    return pairs_from_answers(as_plain, as_mirror, labels, num_classes)


def pairs_from_answers(as_plain: torch.Tensor, as_mirror: torch.Tensor, labels: torch.Tensor,
                       num_classes: int) -> list[dict]:  # fmt: skip
    """Mirror pairs from a classifier's answers on images un-mirrored (``as_plain``) and mirrored (``as_mirror``).
    Of each class's images it recognises un-mirrored, the share whose mirror image it answers with one other class;
    a pair where each class's mirror images go to the other more than to any third class, and at least
    ``MIN_SHARE`` of both classes' recognised images (together, at least ``MIN_IMAGES`` of each) go across: the
    :func:`candidate_pairs` entries that :func:`is_pair` accepts (``classes``, ``share``, ``across``, ``images``).

    Why together, not each way: a network learns left from right one class at a time. On gtsrb_finegrained after 3
    epochs without mirroring, keep right's mirror images went to keep left 41 of 50 times, keep left's to keep
    right 14 of 54 (AMD EPYC Zen 5, seed 0, 2026-12-03)."""
    return [c for c in candidate_pairs(as_plain, as_mirror, labels, num_classes) if is_pair(c)]


def is_pair(candidate: dict) -> bool:
    """Is a :func:`candidate_pairs` entry a mirror pair (``MIN_IMAGES`` of each class, ``MIN_SHARE`` pooled)?"""
    return min(candidate["images"]) >= MIN_IMAGES and sum(candidate["across"]) >= MIN_SHARE * sum(candidate["images"])


def candidate_pairs(as_plain: torch.Tensor, as_mirror: torch.Tensor, labels: torch.Tensor,
                    num_classes: int) -> list[dict]:  # fmt: skip
    """Every pair of classes whose recognised images' mirror images go to each other more than to any third class,
    strongest first, with the images going across each way (``across``, of ``images``), their shares and ``pooled``
    (both classes' images together): the evidence :func:`pairs_from_answers` judges, kept in mirror.json so a miss
    can be seen."""
    ok = as_plain == labels
    right = torch.bincount(labels[ok], minlength=num_classes)
    swaps = torch.bincount(labels[ok] * num_classes + as_mirror[ok], minlength=num_classes**2)
    swaps = swaps.view(num_classes, num_classes).double()
    swaps.fill_diagonal_(0)
    pairs = []
    for a in range(num_classes):
        b = int(swaps[a].argmax())
        if a < b and int(swaps[b].argmax()) == a and min(right[a], right[b]) > 0 and swaps[a, b] + swaps[b, a] > 0:
            across, images = (int(swaps[a, b]), int(swaps[b, a])), (int(right[a]), int(right[b]))
            share = tuple(round(n / m, 3) for n, m in zip(across, images, strict=True))
            pooled = round(sum(across) / sum(images), 3)  # for reading; is_pair judges the counts
            pairs.append({"classes": (a, b), "share": share, "pooled": pooled, "across": across, "images": images})
    return sorted(pairs, key=lambda c: -c["pooled"])
