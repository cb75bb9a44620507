import djqueue


def test_all_is_sorted_and_complete():
    assert djqueue.__all__ == sorted(djqueue.__all__)
    exported = {name for name in dir(djqueue) if not name.startswith("_")}
    public = {name for name in exported if not isinstance(getattr(djqueue, name), type(djqueue))}
    assert set(djqueue.__all__) == public - {"annotations"}
