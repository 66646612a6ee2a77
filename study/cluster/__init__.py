"""Launching a study on a cluster: SLURM and Kubernetes."""
