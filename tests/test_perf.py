"""`bench perf` on a tiny U-ViT: every case measured, ratios against full depth in the same run."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from bench.cli import app
from bench.perf import SAMPLING_CASES, TRAINING_METHODS
from bench.store import read_rows


@pytest.fixture(scope="module")
def perf(tmp_path_factory):
    out = tmp_path_factory.mktemp("perf")
    result = CliRunner().invoke(app, ["perf", "--batch-sizes", "1,3", "--steps", "2", "--repeats", "2",
                                      "--set", "embed_dim=32", "--set", "num_heads=2", "--train-batch", "4",
                                      "--inception-images", "4", "--device", "cpu", "--results", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return out, read_rows(out / "perf.csv")


def test_every_case_at_every_batch_size(perf):
    out, rows = perf
    sampling = [r for r in rows if r["kind"] == "sampling"]
    assert {(r["case"], r["batch_size"]) for r in sampling} == {(c, b) for c, _, _ in SAMPLING_CASES for b in ("1", "3")}
    assert {r["method"] for r in rows if r["kind"] == "training"} == set(TRAINING_METHODS)
    # a model other than the default tiny U-ViT gets its own figure, so the default's is not replaced
    assert (out / "perf-embed_dim32-num_heads2.png").stat().st_size > 1000 and not (out / "perf.png").exists()
    assert all(r["machine"] and r["weights"] == "random" for r in rows)


def test_the_ratios_follow_from_what_ran(perf):
    _, rows = perf
    by = {(r["case"], r["batch_size"]): r for r in rows if r["kind"] == "sampling"}
    for batch in ("1", "3"):
        full = by[("full depth", batch)]
        assert float(full["measured_speedup"]) == 1.0 and float(full["speedup_from_blocks"]) == 1.0
        for block in (3, 6, 9):
            static = by[(f"static, after block {block}", batch)]
            assert float(static["layer_ratio"]) == pytest.approx((block + 1) / 13, abs=1e-4)
            assert float(static["speedup_from_blocks"]) == pytest.approx(13 / (block + 1), abs=1e-3)
            # GMACs: the head and embedding cost too, and the out-blocks (skip linear) more than in-blocks
            assert float(static["speedup_from_gmacs"]) == pytest.approx(13 / (block + 1), rel=0.25)
        for method in ("deediff", "bertxit", "calm"):
            assert float(by[(f"{method}, nothing exits", batch)]["layer_ratio"]) == 1.0
            assert float(by[(f"{method}, exits early", batch)]["layer_ratio"]) < 0.5
        # deciding costs the UEMs' multiply-adds: less than full depth's rate, never more than it
        assert float(by[("deediff, nothing exits", batch)]["speedup_from_gmacs"]) < 1.0


def test_the_extractors_agree(perf):
    _, rows = perf
    inception = [r for r in rows if r["kind"] == "inception"]
    assert len(inception) == 2
    assert all(float(r["max_relative_feature_difference"]) <= 1e-5 for r in inception)
