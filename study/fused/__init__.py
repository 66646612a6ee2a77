"""Fused training: many same-shape cells in one grouped step (horizontal fusion, HFTA-style).

`net.GroupedNet` stacks the members' tensors and runs them as grouped convolutions, one
BatchNorm over the group's channels and a batched-matmul head; `adamw.GroupedAdamW` steps them
with a learning rate and weight decay per member; `train.run_group` is the trial function of
a group. Which cells may share a group is sweep.fusion's (torch-free, for the driver).
"""
