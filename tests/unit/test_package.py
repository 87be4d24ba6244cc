import taskstack


def test_public_names_are_exported_and_documented() -> None:
    assert sorted(taskstack.__all__) == sorted(set(taskstack.__all__))
    for name in taskstack.__all__:
        obj = getattr(taskstack, name)
        assert obj.__doc__, f"taskstack.{name} has no docstring"
