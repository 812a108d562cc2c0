"""`python -m bt_keras.data_check`: the command's name; the command line is `bt_keras.cli.data_check`."""

if __name__ == "__main__":
    from bt_keras.cli import data_check as command_line

    command_line.run()
