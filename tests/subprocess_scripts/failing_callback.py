"""A `--callbacks` factory that raises: tests/cli/test_console.py checks that its traceback reaches a quiet console."""


def make():
    return {}["no such key: a real error"]
