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

Not yet used by training: on frozen ImageNet lite0 features it finds no pair on any of the four domains, gtsrb
included (benchmarks/mirror.py, results/mirror.json, Intel Xeon with AMX, 2 cores, 2026-12-02). There the frozen
features barely tell left from right: a mirrored "dangerous curve to the left" is still predicted as itself 83% of
the time, and mirrored images go to their partner class no more often than un-mirrored ones do. The signal needs a
network fine-tuned without flips (e.g. after a first flip-free fine-tuning epoch of ``--budget``); on generated
mirror-image classes that frozen features do see (diagonal stripes, tests/test_mirror.py) it finds the pair.
"""

from __future__ import annotations

import torch

from finegrain.engine.probe import l2_normalise, logistic_regression

#: share of a class's correctly recognised images whose mirror image goes to one other class, for a mirror pair
MIN_SHARE = 0.5
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
    """Mirror pairs from a classifier's answers on images un-mirrored (``as_plain``) and mirrored (``as_mirror``):
    of each class's images it recognises un-mirrored, the share whose mirror image it answers with one other
    class; a pair where that share is at least ``MIN_SHARE`` both ways, on at least ``MIN_IMAGES`` images of each:
    ``[{"classes": (a, b), "share": (a->b, b->a), "images": (n_a, n_b)}]``."""
    ok = as_plain == labels
    right = torch.bincount(labels[ok], minlength=num_classes)
    swaps = torch.bincount(labels[ok] * num_classes + as_mirror[ok], minlength=num_classes**2)
    share = swaps.view(num_classes, num_classes).double() / right.clamp(min=1)[:, None].double()
    share.fill_diagonal_(0)
    pairs = []
    for a in range(num_classes):
        b = int(share[a].argmax())
        mutual = a < b and int(share[b].argmax()) == a and min(right[a], right[b]) >= MIN_IMAGES
        if mutual and share[a, b] >= MIN_SHARE and share[b, a] >= MIN_SHARE:
            pairs.append({"classes": (a, b), "share": (round(float(share[a, b]), 3), round(float(share[b, a]), 3)),
                          "images": (int(right[a]), int(right[b]))})  # fmt: skip
    return pairs
