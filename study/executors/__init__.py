"""How to run the pending cells: in-process one after another (local), or as Ray Tune trials.

Both run `train.run_cell` and hand each finished (row, epochs) to the driver's `land`; both
have the one signature of study.executor_registry, where they are registered by name.

  local        the local executor; imports no Ray (`--executor local` never loads it)
  ray_connect  starting or joining Ray, and checking a trial size against the cluster
  ray_files    the driver's results folder as seen from any node (the DriverFiles actor)
  ray_tune     the Tune trials, the callback that lands their rows, the retry passes
  codec        a landed row through Tune's result dict (JSON), Ray-free

Nothing here is imported by this package itself: each executor's module is imported by the
registry when that executor runs, so the local one never pays for Ray's import.
"""
