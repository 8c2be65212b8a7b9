"""The time left shown by the command line and under a node (`editing.hosts.PhaseRate`)."""
from conceptedit.editing.hosts import PhaseRate, time_left_text


def test_the_rate_is_per_phase_and_work_from_the_cache_does_not_count():
    now = [0.0]
    rate = PhaseRate(clock=lambda: now[0])
    assert rate.seconds_left(4, 10) is None  # 4 taken from the cache when the phase began: no rate yet
    now[0] = 2.0
    assert rate.seconds_left(6, 10) == 4.0   # 2 done in 2 s, 4 to go
    now[0] = 3.0
    assert rate.seconds_left(0, 5) is None   # a new total: a new phase
    now[0] = 5.0
    assert rate.seconds_left(1, 5) == 8.0
    assert rate.seconds_left(5, 5) is None   # done


def test_time_left_reads_in_seconds_minutes_and_hours():
    assert [time_left_text(s) for s in (35, 180, 7200)] == ["35 s", "3 min", "2.0 h"]
