"""`make bench`: measurements side by side, merged into reports/bench.json.

Sits on top.
"""
