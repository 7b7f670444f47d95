"""Every DiT class of diffusers' ``models/transformers/`` (issue 24): built from a tiny config
(``tests/diffusers_sweep.py``), transformed, untrained = dense, and with real FLOP savings when every block is
skipped and at width 1/4. Classes not swept are listed with the reason; docs/coverage.md is generated from the
same measurements (``benchmarks/coverage.py``).

The nine classes of ``zoo.py`` get the same checks (and more) in test_transform.py, so by default this file sweeps
every other class (one torch.export per kind of block dominates each case; about five minutes on two cores);
``EC_FULL_SWEEP=1`` sweeps the zoo's classes here too.
"""
import os

import pytest

from diffusers_sweep import NOT_A_DIT, SWEEP, ZOO_CLASSES, all_classes, left_out, measure
from diffusers_sweep_rest import WIDTH_ONLY

SWEPT = sorted(SWEEP) if os.environ.get("EC_FULL_SWEEP") else sorted(set(SWEEP) - set(ZOO_CLASSES))


def test_every_class_is_swept_or_left_out_with_a_reason():
    classes = all_classes()
    assert set(SWEEP) <= set(classes), sorted(set(SWEEP) - set(classes))
    assert set(NOT_A_DIT) <= set(classes)
    missing = left_out()
    assert set(missing) | set(SWEEP) == set(classes)
    assert all(reason for reason in missing.values())


@pytest.mark.parametrize("name", SWEPT)
def test_diffusers_class_is_elastic_and_exact(name):
    result = measure(name)
    assert result["dense_scale"] > 0, result  # an all-zero output would make "untrained = dense" vacuous
    assert result["dense_error"] <= 1e-4 * max(1.0, result["dense_scale"]), result
    if name in WIDTH_ONLY:  # blocks found, none a residual skip (the reason is in WIDTH_ONLY): widths must save
        assert result["blocks"] >= 2 and result["skippable"] == 0 and result["ffn_sites"], result
        assert result["width_quarter"] < 1, result
        return
    assert result["blocks"] >= 2 and result["skippable"] >= 1, result
    assert 0 < result["skip_all"] < 1, result
    assert result["skip_all"] <= result["width_quarter"] <= 1, result
    if result["ffn_sites"]:
        assert result["width_quarter"] < 1, result
