"""`python -m bt_keras.evaluate.knn | linear | finetune`: kept as the commands' names; the command lines are
`bt_keras.cli.evaluate_knn`, `bt_keras.cli.evaluate_linear` and `bt_keras.cli.evaluate_finetune`."""
