"""A Python file with no model in it."""


def helper(x):
    return x + 1
