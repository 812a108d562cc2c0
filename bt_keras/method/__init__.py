"""The method, layer 5: the loss (`losses`, and `loss_forms`: which form runs under replicas), LARS and the schedule
(`optim`), mixed precision (`precision`), the online probe (`probe`) and `model.BarlowTwins`, whose `train_step` takes
the true gradient of the global loss."""
