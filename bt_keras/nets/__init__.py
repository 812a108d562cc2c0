"""Networks, layer 2: the backbones (torchvision-layout ResNets, a small CNN), the projector MLP (`heads`) and the
BatchNorm they share (`batch_norm`: the fused fast path and the synchronised form)."""
