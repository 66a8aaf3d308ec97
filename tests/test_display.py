"""How numbers are written for a person (display.py): probabilities beside their threshold, distances."""
from melanoma_siamese.display import distance_text, prevalences_differ, probability_pair, probability_text


def test_terminal_probability_shows_which_side_of_the_threshold_it_is():
    assert probability_text(0.5, 0.2) == "0.5000"
    assert probability_text(0.278812, 0.278834) == "0.27881"  # 0.2788 beside a 0.2788 threshold would hide the order
    assert probability_text(0.2, 0.2) == "0.2000"
    assert probability_text(0.3 - 1e-12, 0.3).endswith("-") and probability_text(0.3 + 1e-12, 0.3).endswith("+")


def test_distances_keep_three_significant_digits_without_an_exponent():
    assert distance_text(0.1234) == "0.1234" and distance_text(0.0092) == "0.00920"
    assert distance_text(0.0000213) == "0.0000213" and distance_text(1.2e-9) == "0.00000000"
    assert distance_text(0.0) == "0.0000" and distance_text(1.5) == "1.5000"
    # Half up on the exact value, as the page's toFixed rounds (Python's format would give 0.0312 and 0.1562).
    assert distance_text(0.03125) == "0.0313" and distance_text(0.15625) == "0.1563"


def test_a_probability_and_its_threshold_share_their_decimals():
    assert probability_pair(0.278812, 0.278834) == ("0.27881", "0.27883")
    assert probability_pair(0.5, 0.2) == ("0.5000", "0.2000")


def test_prevalences_differ_on_odds_not_on_rounding():
    assert not prevalences_differ(0.246, 0.244) and not prevalences_differ(0.02, 0.025)
    assert prevalences_differ(0.02, 0.245) and prevalences_differ(0.3, 0.245)
