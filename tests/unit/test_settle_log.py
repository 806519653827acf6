"""The dead-letter log's budget (coordinator.settle.LogBudget): one line per tenant and reason
every so often, saying how many it held back, so a flood of dead letters cannot flood the log."""

from coordinator.settle import LogBudget


def test_one_line_per_key_per_interval_saying_how_many_were_held_back() -> None:
    now = [100.0]
    said = LogBudget(10.0, clock=lambda: now[0])
    flood, other = ("flood", "over_quota"), ("acme", "malformed")
    assert said.take(flood) == 0  # the first is logged
    assert [said.take(flood) for _ in range(5)] == [None] * 5  # then held back
    assert said.take(other) == 0  # another tenant or reason is not held back by it
    now[0] += 9.9
    assert said.take(flood) is None
    now[0] += 0.1
    assert said.take(flood) == 6  # the next line says how many it did not log
    assert said.take(flood) is None
    now[0] += 10.0
    assert said.take(flood) == 1
    assert said.take(other) == 0  # quiet since its line: nothing held back


def test_it_remembers_a_bounded_number_of_keys() -> None:
    said = LogBudget(10.0, clock=lambda: 0.0)
    for i in range(LogBudget._KEPT + 10):
        assert said.take(("t", str(i))) == 0
    assert len(said._last) == LogBudget._KEPT
