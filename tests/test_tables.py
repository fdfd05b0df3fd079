"""Table cells print the interval's own ends, so asymmetric and clipped intervals read right."""

import math

from pipeline.app.tables import cell, csv_text, latex, markdown


def test_cell_prints_low_and_high_not_a_half_width():
    # Wilson for 199 of 200: asymmetric about the mean; "± 1.3" would claim 100.8 is possible.
    metric = {"mean": 99.5, "low": 97.22, "high": 99.91, "n": 200}
    assert cell(metric) == "99.5 [97.2, 99.9]"
    assert cell({"mean": 25.0, "low": 0.0, "high": 75.0, "n": 4}) == "25.0 [0.0, 75.0]"
    assert cell({"mean": 3.0, "low": math.nan, "high": math.nan, "n": 1}) == "3.0"
    assert cell(None) == "–" and cell({"mean": math.nan, "n": 0}) == "–"


def test_tables_carry_the_interval_in_every_format():
    metrics = {"ES": {"mean": 99.5, "low": 97.22, "high": 99.91, "n": 200}}
    table = [{"model": "m_1", "data": "cf", "editor": "rome", "n": 200, "metrics": metrics}]
    assert "| 99.5 [97.2, 99.9] |" in markdown(table)
    assert "99.5 [97.2, 99.9]" in latex(table) and "m\\_1" in latex(table)
    assert "±" not in markdown(table) + latex(table)
    assert "99.5,97.22,99.91,200" in csv_text(table)
