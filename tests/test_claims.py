"""The papers' claims as rules: synthetic layer profiles that pass or fail each rule."""
import numpy as np
import pandas as pd
import pytest

from embgeom.claims import (NA, NO, PARTLY, YES, anisotropy_profile, claims_table, id_hump, m_grows, mv_tradeoff,
                            q_constant, spearman, within_share_rises)


def profile(**columns) -> pd.DataFrame:
    """A layer table of one model and view: layers 0..L, one value per layer per column."""
    n = len(next(iter(columns.values())))
    df = pd.DataFrame({"model": "m", "stack": "decoder", "view": "all", "layer": np.arange(n), "n_layers": n - 1})
    df["depth"] = df["layer"] / (n - 1)
    for name, values in columns.items():
        df[name] = np.asarray(values, dtype=float)
    return df


# ---- A1: anisotropy
BELL = [0.2, 0.3, 0.6, 0.95, 0.97, 0.98, 0.96, 0.7, 0.4]  # layers 0..8; middle = layers 2..6


def test_decoder_bell_near_one_holds():
    v = anisotropy_profile(profile(anisotropy=BELL), "decoder")
    assert v.mark == YES
    assert v.values["middle_median"] == pytest.approx(np.median([0.6, 0.95, 0.97, 0.98, 0.96]))
    assert v.values["first"] == 0.3 and v.values["last"] == 0.4


def test_decoder_low_middle_fails_and_flat_high_is_partly():
    low = anisotropy_profile(profile(anisotropy=[0.2, 0.3, 0.1, 0.1, 0.1, 0.1, 0.1, 0.2, 0.3]), "decoder")
    assert low.mark == NO
    # near 1 everywhere: close to 1 in the middle, but no bell (the ends are as high)
    flat = anisotropy_profile(profile(anisotropy=[0.95] * 9), "decoder")
    assert flat.mark == PARTLY and flat.values["near_one"] and not flat.values["bell"]
    # a bell that peaks far below 1
    hump = anisotropy_profile(profile(anisotropy=[0.1, 0.1, 0.3, 0.5, 0.6, 0.5, 0.4, 0.2, 0.1]), "decoder")
    assert hump.mark == PARTLY and hump.values["bell"] and not hump.values["near_one"]


def test_encoder_low_and_flat():
    assert anisotropy_profile(profile(anisotropy=[0.05, 0.08, 0.06, 0.09, 0.07]), "encoder").mark == YES
    partly = anisotropy_profile(profile(anisotropy=[0.02, 0.18, 0.06, 0.19, 0.07]), "encoder")  # low, not flat
    assert partly.mark == PARTLY and partly.values["low"] and not partly.values["flat"]
    assert anisotropy_profile(profile(anisotropy=[0.3, 0.9, 0.5, 0.4, 0.3]), "encoder").mark == NO


# ---- A2: ID hump
def test_id_rises_then_falls():
    v = id_hump(profile(id_twonn=[15.0, 4.0, 8.0, 12.0, 9.0, 7.0]))  # layer 0 (15) is not a block: ignored
    assert v.mark == YES
    assert v.values["peak_layer"] == 3 and v.values["rise"] == pytest.approx(2.0)
    assert v.values["fall"] == pytest.approx(1 - 7 / 12)


def test_id_plateau_is_partly_and_flat_fails():
    plateau = id_hump(profile(id_twonn=[3.0, 3.0, 6.0, 10.0, 10.5, 10.4]))
    assert plateau.mark == PARTLY and plateau.values["fall"] < 0.1
    assert id_hump(profile(id_twonn=[5.0, 10.0, 10.2, 10.1, 10.3, 10.0])).mark == NO
    assert id_hump(profile(id_twonn=[np.nan] * 6)).mark == NA


# ---- B1: M-V trade-off
def test_tradeoff_strong_in_half_the_layers():
    v = mv_tradeoff(profile(mv_slope=[0.0, -0.5, -0.6, -0.2, 0.1], mv_r2=[0.9, 0.6, 0.7, 0.3, 0.1]))
    assert v.mark == YES and v.values["strong"] == 2 and v.values["layers"] == 4
    assert v.values["best_layer"] == 2 and v.values["best_slope"] == -0.6


def test_tradeoff_weak_or_positive():
    weak = mv_tradeoff(profile(mv_slope=[0.0, -0.5, -0.6, -0.2, 0.1], mv_r2=[0.9, 0.3, 0.25, 0.3, 0.1]))
    assert weak.mark == PARTLY and weak.values["strong"] == 0 and weak.values["weak"] == 3
    # positive slopes with high R² are no trade-off; layer 0 is not read
    assert mv_tradeoff(profile(mv_slope=[-1.0, 0.5, 0.6, 0.4, 0.3], mv_r2=[0.9, 0.8, 0.9, 0.7, 0.6])).mark == NO


# ---- B2, B3: depth trends
def test_within_share_trend():
    V = np.ones(6)
    rising = within_share_rises(profile(V=V, V_within=[0.0, 0.1, 0.2, 0.25, 0.3, 0.5]))
    assert rising.mark == YES and rising.values["rho"] == pytest.approx(1.0)
    wobbly = within_share_rises(profile(V=V, V_within=[0.0, 0.3, 0.1, 0.2, 0.25, 0.35]))
    assert wobbly.mark == PARTLY  # ranks 4,1,2,3,5 against 1..5: rho = 1 - 6*12/(5*24)
    assert wobbly.values["rho"] == pytest.approx(0.4)
    assert within_share_rises(profile(V=V, V_within=[0.0, 0.5, 0.4, 0.3, 0.2, 0.1])).mark == NO


def test_m_grows():
    assert m_grows(profile(M=[1.0, 2.0, 5.0, 9.0, 30.0])).mark == YES
    assert m_grows(profile(M=[1.0, 30.0, 9.0, 5.0, 2.0])).mark == NO


def test_spearman_matches_ranks_with_ties():
    assert spearman([1, 2, 3, 4], [10, 20, 20, 40]) == pytest.approx(np.corrcoef([1, 2, 3, 4], [1, 2.5, 2.5, 4])[0, 1])
    assert np.isnan(spearman([1, 2, 3], [5, 5, 5]))


# ---- B4: Q constant in post-LN, not in pre-LN
def test_q_constant_depends_on_norm_placement():
    const = profile(q_cv=[0.5, 0.05, 0.07, 0.1, 0.4])  # 3 of 4 blocks <= 0.2
    assert q_constant(const, "post-LN").mark == YES
    assert q_constant(const, "pre-LN").mark == NO
    varied = profile(q_cv=[0.1, 1.5, 2.0, 3.0, 0.1])  # 1 of 4
    assert q_constant(varied, "pre-LN").mark == YES
    assert q_constant(varied, "sandwich").mark == YES
    assert q_constant(varied, "post-LN").mark == NO
    assert q_constant(profile(q_cv=[0.1, 0.1, 0.1, 3.0, 3.0]), "post-LN").mark == PARTLY


# ---- the table
def test_claims_table_has_both_views_per_model_and_claim():
    a = profile(anisotropy=BELL, id_twonn=[9, 3, 5, 8, 11, 10, 9, 8, 6], mv_slope=[0] + [0.1] * 8,
                mv_r2=[0.0] * 9, V=np.ones(9), V_within=np.linspace(0, 0.5, 9), M=np.arange(9) + 1.0,
                q_cv=[2.0] * 9)
    b = a.assign(view="inliers", anisotropy=[0.1] * 9)
    table = claims_table(pd.concat([a, b]), {"m": {"kind": "decoder", "norm_placement": "pre-LN"}})
    assert list(table["claim"]) == ["A1", "A2", "B1", "B2", "B3", "B4"]
    row = table.set_index("claim").loc["A1"]
    assert (row["mark_all"], row["mark_inliers"]) == (YES, NO)
    assert table.set_index("claim").loc["B1", "mark_all"] == NO
    assert table.set_index("claim").loc["B4", "mark_inliers"] == YES
