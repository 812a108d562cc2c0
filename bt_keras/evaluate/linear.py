"""`python -m bt_keras.evaluate.linear`: the command's name, kept; the command line is
`bt_keras.cli.evaluate_linear`."""

if __name__ == "__main__":
    from bt_keras.cli import evaluate_linear as command_line

    __doc__ = command_line.__doc__  # absl's --help prints the __main__ module's docstring
    command_line.command()
