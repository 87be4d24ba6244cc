import tasks


def test_public_names_are_exported_and_documented() -> None:
    assert sorted(tasks.__all__) == sorted(set(tasks.__all__))
    for name in tasks.__all__:
        obj = getattr(tasks, name)
        assert obj.__doc__, f"tasks.{name} has no docstring"
