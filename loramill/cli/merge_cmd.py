"""Placeholder until its issue lands."""


def register(main) -> None:
    pass
