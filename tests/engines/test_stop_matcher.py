from deploy.engines.base import StopMatcher


def feed_all(stops, pieces):
    m = StopMatcher(stops)
    return "".join(m.feed(p) for p in pieces) + m.flush(), m.stopped


def test_stop_split_across_pieces():
    assert feed_all(("END",), ["abc E", "N", "D tail"]) == ("abc ", True)


def test_false_start_is_released():
    assert feed_all(("END",), ["a E", "x", "y"]) == ("a Exy", False)


def test_no_stops_passes_through():
    assert feed_all((), ["a", "b"]) == ("ab", False)


def test_earliest_of_several_stops_wins():
    assert feed_all(("\n\n", "3"), ["1 2 ", "3 4\n\n"]) == ("1 2 ", True)
